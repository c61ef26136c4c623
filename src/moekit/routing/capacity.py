"""Optional expert capacity with token dropping (Switch Transformer / GShard parity).

moekit is dropless by default. With a capacity factor each expert processes at most
``C = ceil(capacity_factor * T * k / E)`` assignments; the rest are dropped (their slot
becomes ``-1`` with weight 0, so those tokens pass through the residual only).
"""

from __future__ import annotations

import math

import torch

from moekit.routing.types import Routing, count_assignments

__all__ = ["expert_capacity", "apply_capacity"]


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """``ceil(capacity_factor * T * k / E)`` assignments per expert."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor: expected > 0, got {capacity_factor}")
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def apply_capacity(routing: Routing, capacity: int) -> Routing:
    """Drop assignments beyond ``capacity`` per expert.

    Priority is GShard's: every token's first choice before any second choice, and within a
    choice rank earlier tokens first. Returns a new :class:`Routing`; ``probs`` are unchanged.
    """
    indices_TK, weights_TK = routing.indices, routing.weights
    num_experts = routing.probs.shape[-1]
    if capacity < 0:
        raise ValueError(f"capacity: expected >= 0, got {capacity}")
    # Rank-major order: flatten [K, T] so all first choices come first.
    flat_KT = indices_TK.t().reshape(-1)
    valid = flat_KT >= 0
    onehot = torch.zeros(flat_KT.numel(), num_experts, dtype=torch.int64, device=flat_KT.device)
    onehot[valid.nonzero(as_tuple=True)[0], flat_KT[valid]] = 1
    position = (onehot.cumsum(dim=0) * onehot).sum(dim=1)  # 1-based rank inside its expert
    keep_KT = valid & (position <= capacity)
    keep_TK = keep_KT.view(indices_TK.shape[1], indices_TK.shape[0]).t()
    new_indices = indices_TK.masked_fill(~keep_TK, -1)
    new_weights = weights_TK.masked_fill(~keep_TK, 0.0)
    return Routing(new_indices, new_weights, routing.probs, count_assignments(new_indices, num_experts))
