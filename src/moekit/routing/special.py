"""Routers that are not a per-token top-k.

- :class:`DenseToSparseRouter` (EvoMoE's DTS gate, Nie et al. 2021): a Gumbel-softmax gate
  whose temperature is annealed with the optimizer step from dense routing (every expert
  above a small threshold) to sparse top-k.
- :class:`ExpertChoiceRouter` (Zhou et al. 2022): each expert takes its top-``C`` tokens,
  ``C = ceil(capacity_factor * T * k / E)``. **Non-causal**: a token's experts depend on the
  other tokens of the batch, so it must not be used for autoregressive decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moekit.routing.topk import check_top_k, linear_gate, unbiased_softmax_logits
from moekit.routing.types import Routing, RouterOutput, assignment_matrix, count_assignments

__all__ = [
    "DenseToSparseRouterConfig",
    "DenseToSparseRouter",
    "ExpertChoiceRouterConfig",
    "ExpertChoiceRouter",
]


@dataclass
class DenseToSparseRouterConfig:
    """dim, num_experts, top_k (the sparse end point).
    tau_start / tau_end: Gumbel-softmax temperatures at step 0 and at ``anneal_steps``
    (annealed geometrically); threshold: dense-phase experts with gate value above it are used.
    After ``anneal_steps`` optimizer steps the gate is plain top-k."""

    dim: int
    num_experts: int
    top_k: int
    tau_start: float = 2.0
    tau_end: float = 0.3
    anneal_steps: int = 1000
    threshold: float = 1e-3

    def __post_init__(self):
        check_top_k(self.top_k, self.num_experts)
        if not (self.tau_start > 0 and self.tau_end > 0):
            raise ValueError(f"tau_start/tau_end: expected > 0, got {self.tau_start}/{self.tau_end}")
        if self.anneal_steps < 0:
            raise ValueError(f"anneal_steps: expected >= 0, got {self.anneal_steps}")


class DenseToSparseRouter(nn.Module):
    """EvoMoE dense-to-sparse gate. The step counter is a buffer advanced by
    :meth:`optimizer_step_done`, so checkpoints resume the schedule."""

    def __init__(self, cfg: DenseToSparseRouterConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = linear_gate(cfg.dim, cfg.num_experts)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def temperature(self) -> float:
        cfg = self.cfg
        if cfg.anneal_steps == 0:
            return cfg.tau_end
        frac = min(int(self.step.item()) / cfg.anneal_steps, 1.0)
        return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** frac

    @property
    def is_sparse(self) -> bool:
        return int(self.step.item()) >= self.cfg.anneal_steps

    def optimizer_step_done(self) -> None:
        self.step += 1

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None) -> RouterOutput:
        cfg = self.cfg
        logits_TE, probs_TE = unbiased_softmax_logits(self.gate, x_TD, cfg.dim, selection_bias_E, "dense_to_sparse")
        if self.is_sparse:
            indices_TK = torch.topk(probs_TE.detach(), cfg.top_k, dim=-1, sorted=True).indices
            weights_TK = probs_TE.gather(1, indices_TK)
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        else:
            noisy_TE = logits_TE
            if self.training:
                uniform = torch.rand_like(logits_TE).clamp(1e-10, 1 - 1e-10)
                noisy_TE = logits_TE - torch.log(-torch.log(uniform))
            gate_TE = (noisy_TE / self.temperature()).softmax(dim=-1)
            sorted_TE, order_TE = gate_TE.detach().sort(dim=-1, descending=True)
            keep_TE = sorted_TE > cfg.threshold
            keep_TE[:, 0] = True
            indices_TK = order_TE.masked_fill(~keep_TE, -1)
            weights_TK = gate_TE.gather(1, order_TE).masked_fill(~keep_TE, 0.0)
        counts_E = count_assignments(indices_TK, cfg.num_experts)
        routing = Routing(indices_TK, weights_TK, probs_TE, counts_E)
        return RouterOutput(routing, logits_TE, probs_TE, assignment_matrix(indices_TK, cfg.num_experts),
                            logits_TE.new_zeros(()))


@dataclass
class ExpertChoiceRouterConfig:
    """dim, num_experts, top_k (average experts per token), capacity_factor (C multiplier)."""

    dim: int
    num_experts: int
    top_k: int
    capacity_factor: float = 1.0

    def __post_init__(self):
        check_top_k(self.top_k, self.num_experts)
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor: expected > 0, got {self.capacity_factor}")


class ExpertChoiceRouter(nn.Module):
    """Expert-choice routing; indices are ``[T, E]`` with ``-1`` where expert ``e`` did not
    pick token ``t``. Every expert processes exactly ``min(C, T)`` tokens."""

    def __init__(self, cfg: ExpertChoiceRouterConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = linear_gate(cfg.dim, cfg.num_experts)

    def capacity(self, num_tokens: int) -> int:
        cfg = self.cfg
        return min(num_tokens, math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts))

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None) -> RouterOutput:
        cfg = self.cfg
        logits_TE, probs_TE = unbiased_softmax_logits(self.gate, x_TD, cfg.dim, selection_bias_E, "expert_choice")
        num_tokens = x_TD.shape[0]
        chosen_TE = torch.zeros_like(probs_TE, dtype=torch.bool)
        cap = self.capacity(num_tokens)
        if cap > 0:
            tokens_EC = probs_TE.detach().t().topk(cap, dim=-1).indices
            chosen_TE.scatter_(0, tokens_EC.t(), True)
        experts_TE = torch.arange(cfg.num_experts, device=x_TD.device).expand(num_tokens, -1)
        indices_TE = experts_TE.masked_fill(~chosen_TE, -1)
        weights_TE = probs_TE.masked_fill(~chosen_TE, 0.0)
        counts_E = count_assignments(indices_TE, cfg.num_experts)
        routing = Routing(indices_TE, weights_TE, probs_TE, counts_E)
        return RouterOutput(routing, logits_TE, probs_TE, assignment_matrix(indices_TE, cfg.num_experts),
                            logits_TE.new_zeros(()))
