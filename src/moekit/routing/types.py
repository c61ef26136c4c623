"""The routing decision shared by every router, balance objective, expert backend and metric."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Routing", "RouterOutput", "count_assignments", "assignment_matrix", "check_router_input"]


class Routing(NamedTuple):
    """Which experts each token uses and with what weight.

    indices: ``[T, K]`` int64 expert ids; ``-1`` marks an unused slot (a null expert, a dropped
        token, a masked choice, or padding for routers with a variable number of experts).
    weights: ``[T, K]`` combine weights (0 where ``indices == -1``), differentiable.
    probs: ``[T, E]`` router probabilities over the real experts (fp32).
    tokens_per_expert: ``[E]`` int64 number of assignments per expert.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor
    tokens_per_expert: torch.Tensor

    @property
    def experts_per_token(self) -> torch.Tensor:
        """``[T]`` number of real experts each token uses."""
        return (self.indices >= 0).sum(dim=-1)


class RouterOutput(NamedTuple):
    """What a router returns to the layer.

    routing: the decision (see :class:`Routing`).
    logits: ``[T, E]`` fp32 router logits over real experts (for the z-loss).
    balance_probs: ``[T, S]`` probabilities over the ``S`` balance slots (``S = E`` except for
        routers with extra slots, e.g. null experts), used by the load-balancing loss.
    balance_assign: ``[T, S]`` float, detached: how many times token ``t`` was assigned to
        slot ``s`` (0 or 1); its column sums are the counts ``c`` of the balance loss.
    reg_loss: scalar, the router's own regulariser, already scaled (0 when none).
    """

    routing: Routing
    logits: torch.Tensor
    balance_probs: torch.Tensor
    balance_assign: torch.Tensor
    reg_loss: torch.Tensor


def count_assignments(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` int64 number of assignments per expert, ignoring ``-1`` slots.

    Written with a fixed-size scatter (slot 0 collects the ``-1`` entries) rather than boolean
    indexing, so it has static shapes under ``torch.compile``.
    """
    flat = indices_TK.reshape(-1) + 1
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=indices_TK.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return counts[1:]


def assignment_matrix(indices_TK: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``[T, S]`` float32 0/1 matrix of the assignments in ``indices_TK`` (``-1`` ignored)."""
    num_tokens = indices_TK.shape[0]
    assign = torch.zeros(num_tokens, num_slots + 1, dtype=torch.float32, device=indices_TK.device)
    assign.scatter_add_(1, indices_TK + 1, torch.ones_like(indices_TK, dtype=torch.float32))
    return assign[:, 1:]


def check_router_input(x_TD: torch.Tensor, dim: int) -> None:
    """Raise ``ValueError`` unless ``x_TD`` is a floating ``[T, dim]`` tensor."""
    if not torch.is_tensor(x_TD) or not x_TD.is_floating_point():
        dtype = getattr(x_TD, "dtype", type(x_TD).__name__)
        raise ValueError(f"x: expected a floating-point tensor, got {dtype}")
    if x_TD.ndim != 2 or x_TD.shape[-1] != dim:
        raise ValueError(f"x: expected last dimension {dim} (dim), got shape {tuple(x_TD.shape)}")
