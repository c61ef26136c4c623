"""The MoE layer: router + balance objective + routed experts (+ shared experts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from moekit import routing as R
from moekit.experts import ACTIVATIONS, ExpertsConfig, GroupedExperts, SharedExperts
from moekit.routing import Routing

__all__ = ["MoEConfig", "MoE", "MoEOutput", "build_router", "router_config", "optimizer_step_done", "ROUTERS", "BALANCES"]

ROUTERS = ("topk", "group_limited", "moge", "null_experts", "top_p", "beam", "dense_to_sparse", "expert_choice")
BALANCES = ("none", "micro", "seq", "global", "aux_free")
_AUX_FREE_ROUTERS = ("topk", "group_limited", "moge", "null_experts", "beam")


@dataclass
class MoEConfig:
    """Configuration of one MoE layer (DESIGN.md, "Public API").

    dim / ffn_dim: model width and expert hidden width. num_experts: E routed experts.
    top_k: experts per token (the maximum for top_p; the average for expert_choice).
    router: one of ``ROUTERS``. score: "softmax" | "sigmoid" (topk, group_limited, moge, beam).
    balance: one of ``BALANCES``; balance_coeff scales the load-balancing loss, z_loss_coeff
    the router z-loss. num_groups / topk_group: group_limited and moge groups.
    bias_update_rate: the loss-free bias step ``gamma``. num_shared_experts: always-on experts
    (one dense MLP of width ``num_shared_experts * ffn_dim``). activation: "swiglu" | "gelu".

    Router-specific knobs: norm_topk_prob, routed_scaling_factor (topk family);
    num_null_experts (null_experts); top_p, top_p_entropy_coeff (top_p); beam_mask_coeff
    (beam); d2s_tau_start, d2s_tau_end, d2s_anneal_steps, d2s_threshold (dense_to_sparse);
    capacity_factor: expert capacity with token dropping (None = dropless; for expert_choice
    the capacity multiplier, default 1). backend: expert compute backend ("auto").
    """

    dim: int
    ffn_dim: int
    num_experts: int
    top_k: int = 2
    router: str = "topk"
    score: str = "softmax"
    balance: str = "global"
    balance_coeff: float = 1e-2
    z_loss_coeff: float = 0.0
    num_groups: int = 1
    topk_group: int = 1
    bias_update_rate: float = 1e-3
    num_shared_experts: int = 0
    activation: str = "swiglu"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    num_null_experts: int = 1
    top_p: float = 0.6
    top_p_entropy_coeff: float = 0.0
    beam_mask_coeff: float = 1e-2
    d2s_tau_start: float = 2.0
    d2s_tau_end: float = 0.3
    d2s_anneal_steps: int = 1000
    d2s_threshold: float = 1e-3
    capacity_factor: float | None = None
    backend: str = "auto"

    def __post_init__(self):
        for name in ("dim", "ffn_dim", "num_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"router: expected one of {ROUTERS}, got {self.router!r}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance: expected one of {BALANCES}, got {self.balance!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k: expected 1 <= top_k <= num_experts={self.num_experts}, got {self.top_k!r}")
        if self.balance == "aux_free" and self.router not in _AUX_FREE_ROUTERS:
            raise ValueError(f"balance: expected a router in {_AUX_FREE_ROUTERS} for 'aux_free', got router={self.router!r}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor: expected > 0 or None, got {self.capacity_factor}")
        for name in ("balance_coeff", "z_loss_coeff", "bias_update_rate", "num_shared_experts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        router_config(self)  # validates the router-specific fields (groups, top_p, ...)


def router_config(cfg: MoEConfig):
    """The config dataclass of the router named by ``cfg.router`` (validated on construction)."""
    base = dict(dim=cfg.dim, num_experts=cfg.num_experts, top_k=cfg.top_k)
    topk = dict(base, score=cfg.score, norm_topk_prob=cfg.norm_topk_prob,
                routed_scaling_factor=cfg.routed_scaling_factor)
    if cfg.router == "topk":
        return R.TopKRouterConfig(**topk)
    if cfg.router == "group_limited":
        return R.GroupLimitedRouterConfig(**topk, num_groups=cfg.num_groups, topk_group=cfg.topk_group)
    if cfg.router == "moge":
        return R.MoGERouterConfig(**topk, num_groups=cfg.num_groups)
    if cfg.router == "beam":
        return R.BeamRouterConfig(**topk, mask_reg_coeff=cfg.beam_mask_coeff)
    if cfg.router == "null_experts":
        return R.NullExpertsRouterConfig(**base, num_null_experts=cfg.num_null_experts,
                                         norm_topk_prob=cfg.norm_topk_prob)
    if cfg.router == "top_p":
        return R.TopPRouterConfig(dim=cfg.dim, num_experts=cfg.num_experts, max_k=cfg.top_k,
                                  top_p=cfg.top_p, entropy_coeff=cfg.top_p_entropy_coeff)
    if cfg.router == "dense_to_sparse":
        return R.DenseToSparseRouterConfig(**base, tau_start=cfg.d2s_tau_start, tau_end=cfg.d2s_tau_end,
                                           anneal_steps=cfg.d2s_anneal_steps, threshold=cfg.d2s_threshold)
    if cfg.router == "expert_choice":
        return R.ExpertChoiceRouterConfig(**base, capacity_factor=cfg.capacity_factor or 1.0)
    raise ValueError(f"router: expected one of {ROUTERS}, got {cfg.router!r}")


_ROUTER_MODULES = {
    "topk": R.TopKRouter,
    "group_limited": R.GroupLimitedRouter,
    "moge": R.MoGERouter,
    "beam": R.BeamRouter,
    "null_experts": R.NullExpertsRouter,
    "top_p": R.TopPRouter,
    "dense_to_sparse": R.DenseToSparseRouter,
    "expert_choice": R.ExpertChoiceRouter,
}


def build_router(cfg: MoEConfig) -> nn.Module:
    """The router module named by ``cfg.router``, with its own config dataclass."""
    return _ROUTER_MODULES[cfg.router](router_config(cfg))


class MoEOutput(NamedTuple):
    """hidden: ``[..., dim]`` like the input. aux_loss: scalar, already scaled by its
    coefficients (0 when none). routing: the :class:`moekit.Routing` of the flattened tokens."""

    hidden: torch.Tensor
    aux_loss: torch.Tensor
    routing: Routing


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    ``x`` is ``[..., dim]``; for ``balance="seq"`` the second-to-last dimension is the
    sequence (``[B, S, dim]``; a 2-D input is one sequence). dp_group: the data-parallel
    process group the global-batch counts and loss-free counts are summed over (default: the
    WORLD group when ``torch.distributed`` is initialised). experts: a routed-experts module
    with the forward contract of :class:`moekit.experts.GroupedExperts` to use instead of a new
    one (e.g. expert-parallel experts that hold only this rank's slots).
    """

    def __init__(self, cfg: MoEConfig, dp_group=None, experts: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.router = build_router(cfg)
        self.experts = experts if experts is not None else GroupedExperts(
            ExpertsConfig(cfg.dim, cfg.ffn_dim, cfg.num_experts, cfg.activation, cfg.backend))
        self.shared = (SharedExperts(cfg.dim, cfg.num_shared_experts * cfg.ffn_dim, cfg.activation)
                       if cfg.num_shared_experts > 0 else None)
        num_slots = cfg.num_experts + (cfg.num_null_experts if cfg.router == "null_experts" else 0)
        self.global_balance = R.GlobalBalance(num_slots, cfg.top_k, dp_group) if cfg.balance == "global" else None
        self.aux_free = R.AuxFreeBias(cfg.num_experts, cfg.bias_update_rate, dp_group) if cfg.balance == "aux_free" else None

    def route(self, x_TD: torch.Tensor) -> R.RouterOutput:
        """Run the router (with the loss-free bias and the capacity limit, if configured)."""
        cfg = self.cfg
        bias = self.aux_free.bias if self.aux_free is not None else None
        out = self.router(x_TD, bias)
        if cfg.capacity_factor is not None and cfg.router != "expert_choice":
            cap = R.expert_capacity(x_TD.shape[0], cfg.top_k, cfg.num_experts, cfg.capacity_factor)
            out = out._replace(routing=R.apply_capacity(out.routing, cap))
        return out

    def balance_loss(self, out: R.RouterOutput, lead_shape: torch.Size) -> torch.Tensor:
        """The unscaled load-balancing loss of ``cfg.balance`` (0 for none / aux_free)."""
        cfg = self.cfg
        probs, assign = out.balance_probs, out.balance_assign
        if cfg.balance == "micro":
            return R.switch_loss(assign.sum(0), probs, probs.shape[0], cfg.top_k)
        if cfg.balance == "seq":
            seq_len = lead_shape[-1] if len(lead_shape) >= 2 else probs.shape[0]
            num_seqs = probs.shape[0] // max(seq_len, 1)
            return R.sequence_switch_loss(assign.view(num_seqs, seq_len, -1),
                                          probs.view(num_seqs, seq_len, -1), cfg.top_k)
        if cfg.balance == "global":
            return self.global_balance(assign.sum(0), probs)
        return probs.new_zeros(())

    def forward(self, x: torch.Tensor) -> MoEOutput:
        cfg = self.cfg
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ValueError(f"x: expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim < 1 or x.shape[-1] != cfg.dim:
            raise ValueError(f"x: expected last dimension {cfg.dim} (dim), got shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, cfg.dim)
        out = self.route(x_TD)
        r = out.routing
        y_TD = self.experts(x_TD, r.indices, r.weights)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        aux = out.reg_loss
        if cfg.balance_coeff > 0 and cfg.balance not in ("none", "aux_free"):
            aux = aux + cfg.balance_coeff * self.balance_loss(out, x.shape[:-1])
        if cfg.z_loss_coeff > 0:
            aux = aux + cfg.z_loss_coeff * R.z_loss(out.logits)
        if self.aux_free is not None:
            self.aux_free.accumulate(r.tokens_per_expert)
        return MoEOutput(y_TD.reshape(x.shape), aux, r)

    def optimizer_step_done(self) -> None:
        """Reset the global-batch counts, update the loss-free bias, advance schedules."""
        for part in (self.global_balance, self.aux_free, self.router):
            step = getattr(part, "optimizer_step_done", None)
            if step is not None:
                step()


def optimizer_step_done(model: nn.Module) -> None:
    """Call once per optimizer step: every MoE layer in ``model`` resets its global-batch
    counts, updates its loss-free bias and advances its router schedule. A no-op for layers
    that need nothing."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.optimizer_step_done()
