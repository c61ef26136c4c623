"""Top-k routers with a fixed number of experts per token.

- :class:`TopKRouter`: softmax-then-top-k (Mixtral / Qwen / OLMoE, optional renormalisation)
  or sigmoid scores with normalisation and a routed scaling factor (DeepSeek-V3).
- :class:`GroupLimitedRouter`: DeepSeek-V3 group / node-limited routing: keep the
  ``topk_group`` best groups ranked by the sum of their top-2 scores, then top-k inside them.
- :class:`MoGERouter`: Pangu Pro's Mixture of Grouped Experts: exactly ``k / G`` experts from
  each of ``G`` equal groups, so group loads are equal by construction.

The router logits are computed in fp32 whatever the activation dtype, so the selection does
not depend on autocast. A selection bias (loss-free balancing) changes which experts are
chosen but never the combine weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.routing.types import Routing, RouterOutput, assignment_matrix, check_router_input, count_assignments

__all__ = [
    "TopKRouterConfig",
    "TopKRouter",
    "GroupLimitedRouterConfig",
    "GroupLimitedRouter",
    "MoGERouterConfig",
    "MoGERouter",
    "router_logits",
    "linear_gate",
    "check_top_k",
    "check_groups",
    "unbiased_softmax_logits",
]

_SCORES = ("softmax", "sigmoid")


def linear_gate(dim: int, num_outputs: int) -> nn.Linear:
    """A bias-free ``dim -> num_outputs`` router projection, initialised with std ``dim**-0.5``."""
    gate = nn.Linear(dim, num_outputs, bias=False)
    nn.init.normal_(gate.weight, std=dim ** -0.5)
    return gate


def check_top_k(top_k: int, num_experts: int, name: str = "top_k") -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"{name}: expected 1 <= {name} <= num_experts={num_experts}, got {top_k}")


def check_groups(num_groups: int, num_experts: int) -> None:
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"num_groups: expected a divisor of num_experts={num_experts}, got {num_groups}")


def router_logits(gate: nn.Linear, x_TD: torch.Tensor) -> torch.Tensor:
    """``[T, E]`` fp32 logits of a linear gate, outside autocast (routing precision matters)."""
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        bias = None if gate.bias is None else gate.bias.float()
        return F.linear(x_TD.float(), gate.weight.float(), bias)


def unbiased_softmax_logits(gate: nn.Linear, x_TD: torch.Tensor, dim: int,
                            selection_bias_E: torch.Tensor | None, router: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared prologue of routers without a selection bias: check ``x_TD``, refuse a
    loss-free bias, and return fp32 ``(logits_TE, softmax probs_TE)``."""
    check_router_input(x_TD, dim)
    if selection_bias_E is not None:
        raise ValueError(f"balance: 'aux_free' is not supported with router={router!r}")
    logits_TE = router_logits(gate, x_TD)
    return logits_TE, logits_TE.softmax(dim=-1)


@dataclass
class TopKRouterConfig:
    """dim: model width. num_experts: E. top_k: experts per token.
    score: "softmax" (probabilities) or "sigmoid" (DeepSeek-V3 affinities).
    norm_topk_prob: renormalise the k chosen weights to sum to 1 (always done for sigmoid).
    routed_scaling_factor: multiplies the combine weights (DeepSeek-V3 uses 2.5)."""

    dim: int
    num_experts: int
    top_k: int
    score: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        if self.score not in _SCORES:
            raise ValueError(f"score: expected one of {_SCORES}, got {self.score!r}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts: expected >= 1, got {self.num_experts}")
        check_top_k(self.top_k, self.num_experts)


class TopKRouter(nn.Module):
    """Linear gate, score, select the top-k (optionally with a selection bias), weight."""

    def __init__(self, cfg: TopKRouterConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = linear_gate(cfg.dim, cfg.num_experts)

    def select(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """``[T, k]`` chosen expert ids from selection scores ``[T, E]``."""
        return torch.topk(choice_TE, self.cfg.top_k, dim=-1, sorted=True).indices

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None) -> RouterOutput:
        check_router_input(x_TD, self.cfg.dim)
        logits_TE = router_logits(self.gate, x_TD)
        if self.cfg.score == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
            probs_TE = scores_TE
        else:
            scores_TE = logits_TE.sigmoid()
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        choice_TE = scores_TE.detach()
        if selection_bias_E is not None:
            choice_TE = choice_TE + selection_bias_E.to(choice_TE)
        indices_TK = self.select(choice_TE)
        weights_TK = scores_TE.gather(1, indices_TK)
        if self.cfg.score == "sigmoid" or self.cfg.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        weights_TK = weights_TK * self.cfg.routed_scaling_factor
        counts_E = count_assignments(indices_TK, self.cfg.num_experts)
        routing = Routing(indices_TK, weights_TK, probs_TE, counts_E)
        return RouterOutput(routing, logits_TE, probs_TE, assignment_matrix(indices_TK, self.cfg.num_experts),
                            logits_TE.new_zeros(()))


@dataclass
class GroupLimitedRouterConfig(TopKRouterConfig):
    """num_groups: G equal groups of experts (e.g. one per node). topk_group: groups kept per
    token (DeepSeek-V3: 8 groups, 4 kept)."""

    num_groups: int = 1
    topk_group: int = 1

    def __post_init__(self):
        super().__post_init__()
        check_groups(self.num_groups, self.num_experts)
        if not 1 <= self.topk_group <= self.num_groups:
            raise ValueError(f"topk_group: expected 1 <= topk_group <= num_groups={self.num_groups}, got {self.topk_group}")
        per_group = self.num_experts // self.num_groups
        if self.top_k > self.topk_group * per_group:
            raise ValueError(f"top_k: expected <= topk_group * experts per group = {self.topk_group * per_group}, got {self.top_k}")


class GroupLimitedRouter(TopKRouter):
    """DeepSeek-V3 group-limited selection; scoring and weighting as :class:`TopKRouter`."""

    def select(self, choice_TE: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        num_tokens = choice_TE.shape[0]
        per_group = cfg.num_experts // cfg.num_groups
        grouped_TGe = choice_TE.view(num_tokens, cfg.num_groups, per_group)
        group_score_TG = grouped_TGe.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_score_TG.topk(cfg.topk_group, dim=-1).indices, True)
        masked_TE = grouped_TGe.masked_fill(~keep_TG[..., None], float("-inf")).view(num_tokens, -1)
        return torch.topk(masked_TE, cfg.top_k, dim=-1, sorted=True).indices


@dataclass
class MoGERouterConfig(TopKRouterConfig):
    """num_groups: G equal groups; each token takes exactly top_k / G experts from each."""

    num_groups: int = 1

    def __post_init__(self):
        super().__post_init__()
        check_groups(self.num_groups, self.num_experts)
        if self.top_k % self.num_groups:
            raise ValueError(f"top_k: expected a multiple of num_groups={self.num_groups} for moge, got {self.top_k}")


class MoGERouter(TopKRouter):
    """Mixture of Grouped Experts: a top-(k/G) inside every group."""

    def select(self, choice_TE: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        num_tokens = choice_TE.shape[0]
        per_group = cfg.num_experts // cfg.num_groups
        k_per_group = cfg.top_k // cfg.num_groups
        local_TGk = choice_TE.view(num_tokens, cfg.num_groups, per_group).topk(k_per_group, dim=-1).indices
        offsets_G = torch.arange(cfg.num_groups, device=choice_TE.device) * per_group
        return (local_TGk + offsets_G[None, :, None]).reshape(num_tokens, cfg.top_k)
