"""Routers where tokens use a variable number of real experts.

- :class:`NullExpertsRouter` (AdaMoE, Zeng et al. 2024): ``m`` null experts (zero output, zero
  cost) join the top-k, so easy tokens spend fewer real experts.
- :class:`TopPRouter` (Huang et al. 2024): the smallest expert set whose cumulative
  probability reaches ``p`` (1 to ``max_k`` experts), with an optional entropy regulariser.
- :class:`BeamRouter` (binary expert activation masks): a learned mask
  ``sigmoid(x W_m) > 0.5`` over the top-k choices, trained with a straight-through estimator
  and an L1 regulariser pushing masks off; at inference masked experts are skipped.

Unused slots are marked ``-1`` in ``Routing.indices`` with weight 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moekit.routing.topk import TopKRouter, TopKRouterConfig, check_top_k, linear_gate, router_logits, unbiased_softmax_logits
from moekit.routing.types import Routing, RouterOutput, assignment_matrix, check_router_input, count_assignments

__all__ = [
    "NullExpertsRouterConfig",
    "NullExpertsRouter",
    "TopPRouterConfig",
    "TopPRouter",
    "BeamRouterConfig",
    "BeamRouter",
    "flops_saved",
]


def flops_saved(routing: Routing, top_k: int) -> float:
    """Share of the ``T * top_k`` expert computations a token budget of ``top_k`` would do that
    this routing skips (slots marked ``-1`` or with a zero combine weight)."""
    num_tokens = routing.indices.shape[0]
    if num_tokens == 0:
        return 0.0
    used = ((routing.indices >= 0) & (routing.weights != 0)).sum().item()
    return 1.0 - used / (num_tokens * top_k)


@dataclass
class NullExpertsRouterConfig:
    """dim, num_experts (real experts E), top_k (slots per token, real or null),
    num_null_experts: m >= 1 null experts; norm_topk_prob: renormalise over the k chosen."""

    dim: int
    num_experts: int
    top_k: int
    num_null_experts: int = 1
    norm_topk_prob: bool = True

    def __post_init__(self):
        if self.num_null_experts < 1:
            raise ValueError(f"num_null_experts: expected >= 1 for null_experts, got {self.num_null_experts}")
        check_top_k(self.top_k, self.num_experts)


class NullExpertsRouter(nn.Module):
    """Softmax over ``E + m`` slots, top-k over all of them; null choices become ``-1``.

    The load-balancing loss sees all ``E + m`` slots, so the router is pushed to use null
    experts as often as real ones on average, which is what lets it save compute.
    """

    def __init__(self, cfg: NullExpertsRouterConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = linear_gate(cfg.dim, cfg.num_experts + cfg.num_null_experts)

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None) -> RouterOutput:
        cfg = self.cfg
        check_router_input(x_TD, cfg.dim)
        logits_TS = router_logits(self.gate, x_TD)
        probs_TS = logits_TS.softmax(dim=-1)
        choice_TS = probs_TS.detach()
        if selection_bias_E is not None:
            pad = choice_TS.new_zeros(cfg.num_null_experts)
            choice_TS = choice_TS + torch.cat([selection_bias_E.to(choice_TS), pad])
        slots_TK = torch.topk(choice_TS, cfg.top_k, dim=-1, sorted=True).indices
        weights_TK = probs_TS.gather(1, slots_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        is_null = slots_TK >= cfg.num_experts
        indices_TK = slots_TK.masked_fill(is_null, -1)
        weights_TK = weights_TK.masked_fill(is_null, 0.0)
        counts_E = count_assignments(indices_TK, cfg.num_experts)
        slot_assign = assignment_matrix(slots_TK, probs_TS.shape[1])
        routing = Routing(indices_TK, weights_TK, probs_TS[:, : cfg.num_experts], counts_E)
        return RouterOutput(routing, logits_TS[:, : cfg.num_experts], probs_TS, slot_assign,
                            logits_TS.new_zeros(()))


@dataclass
class TopPRouterConfig:
    """dim, num_experts; top_p: cumulative probability to reach, in (0, 1];
    max_k: at most this many experts; entropy_coeff: weight of the entropy regulariser."""

    dim: int
    num_experts: int
    max_k: int
    top_p: float = 0.6
    entropy_coeff: float = 0.0

    def __post_init__(self):
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected 0 < top_p <= 1, got {self.top_p}")
        check_top_k(self.max_k, self.num_experts)


class TopPRouter(nn.Module):
    """Dynamic top-p routing; weights are the chosen probabilities (not renormalised)."""

    def __init__(self, cfg: TopPRouterConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = linear_gate(cfg.dim, cfg.num_experts)

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None) -> RouterOutput:
        cfg = self.cfg
        logits_TE, probs_TE = unbiased_softmax_logits(self.gate, x_TD, cfg.dim, selection_bias_E, "top_p")
        sorted_TK, order_TK = probs_TE.detach().sort(dim=-1, descending=True)
        sorted_TK, order_TK = sorted_TK[:, : cfg.max_k], order_TK[:, : cfg.max_k]
        # Keep slot j while the mass of the slots before it is still short of p: the
        # smallest prefix reaching p, always at least one expert.
        before_TK = sorted_TK.cumsum(dim=-1) - sorted_TK
        keep_TK = before_TK < cfg.top_p
        keep_TK[:, 0] = True
        indices_TK = order_TK.masked_fill(~keep_TK, -1)
        weights_TK = probs_TE.gather(1, order_TK).masked_fill(~keep_TK, 0.0)
        counts_E = count_assignments(indices_TK, cfg.num_experts)
        reg = logits_TE.new_zeros(())
        if cfg.entropy_coeff > 0 and probs_TE.shape[0] > 0:
            entropy_T = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(dim=-1)
            reg = cfg.entropy_coeff * entropy_T.mean()
        routing = Routing(indices_TK, weights_TK, probs_TE, counts_E)
        return RouterOutput(routing, logits_TE, probs_TE, assignment_matrix(indices_TK, cfg.num_experts), reg)


@dataclass
class BeamRouterConfig(TopKRouterConfig):
    """A top-k router plus binary activation masks. mask_reg_coeff: weight of the L1 penalty
    on the soft masks; mask_init_bias: initial mask logit (positive: all masks start on)."""

    mask_reg_coeff: float = 1e-2
    mask_init_bias: float = 2.0


class BeamRouter(TopKRouter):
    """Top-k routing whose k choices are each switched on or off by a learned binary mask.

    Training: the combine weight is multiplied by the hard mask in the forward pass, while the
    gradient flows to the soft mask (straight-through), so every chosen expert is still
    computed. Eval: masked choices are ``-1`` and skipped.
    """

    def __init__(self, cfg: BeamRouterConfig):
        super().__init__(cfg)
        self.mask_proj = nn.Linear(cfg.dim, cfg.num_experts, bias=True)
        nn.init.zeros_(self.mask_proj.weight)
        nn.init.constant_(self.mask_proj.bias, cfg.mask_init_bias)

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None) -> RouterOutput:
        out = super().forward(x_TD, selection_bias_E)
        r = out.routing
        soft_TK = router_logits(self.mask_proj, x_TD).sigmoid().gather(1, r.indices)
        hard_TK = (soft_TK > 0.5).to(soft_TK.dtype)
        reg = self.cfg.mask_reg_coeff * soft_TK.mean() if soft_TK.numel() else soft_TK.sum()
        if self.training:
            mask_TK = hard_TK + soft_TK - soft_TK.detach()
            indices_TK = r.indices
        else:
            mask_TK = hard_TK
            indices_TK = r.indices.masked_fill(hard_TK == 0, -1)
        weights_TK = r.weights * mask_TK
        counts_E = count_assignments(indices_TK, self.cfg.num_experts)
        routing = Routing(indices_TK, weights_TK, r.probs, counts_E)
        return RouterOutput(routing, out.logits, out.balance_probs, out.balance_assign, reg)
