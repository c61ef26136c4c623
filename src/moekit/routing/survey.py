"""A quick, reproducible comparison of every router on one synthetic task (CPU-sized).

Tokens come from a mixture of Gaussian clusters with Zipf-skewed cluster frequencies, so an
untrained router is unbalanced; each router (with its balance objective) trains a small MoE
layer to imitate a fixed random teacher MLP. Reported per router: final training loss, MaxVio
and CV of the expert load on a held-out window, mean real experts per token, share of expert
FLOPs saved against ``top_k`` per token, and milliseconds per training step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moekit.layer import MoE, MoEConfig, optimizer_step_done
from moekit.metrics import coefficient_of_variation, max_vio
from moekit.routing.adaptive import flops_saved

__all__ = ["SurveyConfig", "DEFAULT_ARMS", "clustered_tokens", "survey_router"]

# (name, router, balance, extra MoEConfig fields)
DEFAULT_ARMS: tuple[tuple[str, str, str, dict], ...] = (
    ("topk / none", "topk", "none", {}),
    ("topk / micro", "topk", "micro", {"balance_coeff": 0.1}),
    ("topk / seq", "topk", "seq", {"balance_coeff": 0.1}),
    ("topk / global", "topk", "global", {"balance_coeff": 0.1}),
    ("topk / aux_free", "topk", "aux_free", {"bias_update_rate": 1e-2}),
    ("sigmoid group_limited / aux_free", "group_limited", "aux_free",
     {"score": "sigmoid", "num_groups": 4, "topk_group": 2, "bias_update_rate": 1e-2}),
    ("moge / micro", "moge", "micro", {"num_groups": 2, "balance_coeff": 0.1}),
    ("null_experts / global", "null_experts", "global", {"num_null_experts": 4, "balance_coeff": 0.1}),
    ("top_p / micro", "top_p", "micro", {"top_p": 0.5, "balance_coeff": 0.1}),
    ("beam / global", "beam", "global", {"beam_mask_coeff": 1e-2, "balance_coeff": 0.1}),
    ("dense_to_sparse / micro", "dense_to_sparse", "micro", {"d2s_anneal_steps": 60, "balance_coeff": 0.1}),
    ("expert_choice / none", "expert_choice", "none", {}),
)


@dataclass
class SurveyConfig:
    """Task size: dim, ffn_dim, num_experts, top_k; tokens per step; optimizer steps;
    clusters (domains) of the input distribution with Zipf exponent ``skew``; seed."""

    dim: int = 32
    ffn_dim: int = 32
    num_experts: int = 8
    top_k: int = 2
    tokens: int = 256
    steps: int = 120
    clusters: int = 8
    skew: float = 1.2
    lr: float = 3e-3
    seed: int = 0


def clustered_tokens(cfg: SurveyConfig, num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """``[T, dim]`` tokens from Zipf-weighted Gaussian clusters (centres fixed by ``cfg.seed``)."""
    centres = torch.randn(cfg.clusters, cfg.dim, generator=torch.Generator().manual_seed(cfg.seed)) * 2.0
    weights = torch.arange(1, cfg.clusters + 1, dtype=torch.float64) ** -cfg.skew
    which = torch.multinomial(weights, num_tokens, replacement=True, generator=generator)
    return centres[which] + torch.randn(num_tokens, cfg.dim, generator=generator)


def survey_router(cfg: SurveyConfig, router: str, balance: str, extra: dict) -> dict:
    """Train one arm and return its figures (see module docstring)."""
    torch.manual_seed(cfg.seed)
    layer = MoE(MoEConfig(dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_experts=cfg.num_experts,
                          top_k=cfg.top_k, router=router, balance=balance, **extra))
    teacher = torch.nn.Sequential(torch.nn.Linear(cfg.dim, 4 * cfg.dim), torch.nn.GELU(),
                                  torch.nn.Linear(4 * cfg.dim, cfg.dim))
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(layer.parameters(), lr=cfg.lr)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    start = time.perf_counter()
    loss = torch.zeros(())
    for _ in range(cfg.steps):
        x = clustered_tokens(cfg, cfg.tokens, data_gen)
        out = layer(x)
        loss = torch.nn.functional.mse_loss(out.hidden, teacher(x))
        opt.zero_grad(set_to_none=True)
        (loss + out.aux_loss).backward()
        opt.step()
        optimizer_step_done(layer)
    step_ms = 1e3 * (time.perf_counter() - start) / max(cfg.steps, 1)
    layer.eval()
    with torch.no_grad():
        r = layer(clustered_tokens(cfg, 8 * cfg.tokens, torch.Generator().manual_seed(cfg.seed + 2))).routing
    counts = r.tokens_per_expert
    return {
        "router": router,
        "balance": balance,
        "train_loss": loss.item(),
        "max_vio": float(max_vio(counts).mean()),
        "cv": float(coefficient_of_variation(counts).mean()),
        "experts_per_token": float(r.experts_per_token.float().mean()),
        "flops_saved": flops_saved(r, cfg.top_k),
        "step_ms": step_ms,
    }
