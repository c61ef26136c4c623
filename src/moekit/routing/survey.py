"""A quick, reproducible comparison of every router on one synthetic task (CPU-sized).

Tokens come from Gaussian clusters ("domains") with Zipf-skewed frequencies, so an untrained
router is unbalanced. Each optimizer step accumulates ``micro_batches`` micro-batches, and each
micro-batch holds sequences of a single cluster, the setting where micro-batch balancing
fights specialization (Qiu et al. 2025). Each router (with its balance objective) trains a
small MoE layer to imitate a fixed random teacher MLP. Reported per router: final training
loss, MaxVio and CV of the expert load on a held-out window drawn from the cluster mixture,
specialization of experts to clusters (top-1 share, NMI), mean real experts per token, share of
expert FLOPs saved against ``top_k`` per token, and milliseconds per optimizer step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moekit.layer import MoE, MoEConfig, optimizer_step_done
from moekit.metrics import coefficient_of_variation, max_vio, specialization
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
    """Task size: dim, ffn_dim, num_experts, top_k; tokens per optimizer step, split into
    ``micro_batches`` single-cluster micro-batches of sequences of ``seq_len`` tokens;
    optimizer steps; clusters (domains) with Zipf exponent ``skew``; seed."""

    dim: int = 32
    ffn_dim: int = 32
    num_experts: int = 8
    top_k: int = 2
    tokens: int = 256
    micro_batches: int = 4
    seq_len: int = 16
    steps: int = 100
    clusters: int = 8
    skew: float = 1.2
    lr: float = 3e-3
    seed: int = 0


def clustered_tokens(cfg: SurveyConfig, num_tokens: int, generator: torch.Generator,
                     cluster: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``([T, dim] tokens, [T] cluster ids)`` from Zipf-weighted Gaussian clusters (centres
    fixed by ``cfg.seed``); all from ``cluster`` when given."""
    centres = torch.randn(cfg.clusters, cfg.dim, generator=torch.Generator().manual_seed(cfg.seed)) * 2.0
    if cluster is None:
        weights = torch.arange(1, cfg.clusters + 1, dtype=torch.float64) ** -cfg.skew
        which = torch.multinomial(weights, num_tokens, replacement=True, generator=generator)
    else:
        which = torch.full((num_tokens,), cluster, dtype=torch.int64)
    return centres[which] + torch.randn(num_tokens, cfg.dim, generator=generator), which


def _step_batches(cfg: SurveyConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """One optimizer step: ``micro_batches`` tensors ``[B, seq_len, dim]``, one cluster each."""
    weights = torch.arange(1, cfg.clusters + 1, dtype=torch.float64) ** -cfg.skew
    per_micro = max(cfg.seq_len, cfg.tokens // cfg.micro_batches // cfg.seq_len * cfg.seq_len)
    out = []
    for _ in range(cfg.micro_batches):
        cluster = int(torch.multinomial(weights, 1, generator=generator))
        x, _ = clustered_tokens(cfg, per_micro, generator, cluster)
        out.append(x.view(-1, cfg.seq_len, cfg.dim))
    return out


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
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros(())
        for x in _step_batches(cfg, data_gen):
            out = layer(x)
            mse = torch.nn.functional.mse_loss(out.hidden, teacher(x)) / cfg.micro_batches
            (mse + out.aux_loss / cfg.micro_batches).backward()
            loss = loss + mse.detach()
        opt.step()
        optimizer_step_done(layer)
    step_ms = 1e3 * (time.perf_counter() - start) / max(cfg.steps, 1)
    layer.eval()
    x, cluster = clustered_tokens(cfg, 8 * cfg.tokens, torch.Generator().manual_seed(cfg.seed + 2))
    with torch.no_grad():
        r = layer(x).routing
    counts = r.tokens_per_expert
    by_cluster_CE = torch.zeros(cfg.clusters, cfg.num_experts)
    valid = r.indices >= 0
    by_cluster_CE.index_put_((cluster[:, None].expand_as(r.indices)[valid], r.indices[valid]),
                             torch.ones(int(valid.sum())), accumulate=True)
    spec = specialization(by_cluster_CE, cfg.top_k)
    return {
        "router": router,
        "balance": balance,
        "train_loss": loss.item(),
        "max_vio": float(max_vio(counts).mean()),
        "cv": float(coefficient_of_variation(counts).mean()),
        "top1_share": spec["top1_share"],
        "nmi": spec["nmi"],
        "experts_per_token": float(r.experts_per_token.float().mean()),
        "flops_saved": flops_saved(r, cfg.top_k),
        "step_ms": step_ms,
    }
