"""Vectorised dropless expert computation for any device: sort the assignments by expert,
run each expert once on its contiguous block of tokens, scatter back with the weights.

This is the CPU default. It loops over experts in Python (one GEMM pair per expert that has
tokens), which is right for CPUs and small expert counts; GPUs use the grouped-GEMM backends.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moekit.experts.reference import connect, expert_mlp

__all__ = ["SortedAssignments", "sort_assignments", "experts_sorted"]


class SortedAssignments(NamedTuple):
    """The valid ``(token, slot)`` assignments in expert order.

    token_ids_N: ``[N]`` token of each assignment; slot_ids_N: ``[N]`` flat index into
    ``[T * K]`` (to gather weights); counts_E: ``[E]`` assignments per expert.
    """

    token_ids_N: torch.Tensor
    slot_ids_N: torch.Tensor
    counts_E: torch.Tensor


def sort_assignments(indices_TK: torch.Tensor, num_experts: int) -> SortedAssignments:
    """Group the assignments of ``indices_TK`` (``-1`` skipped) by expert, stably."""
    flat = indices_TK.reshape(-1)
    slot_ids = torch.nonzero(flat >= 0, as_tuple=True)[0]
    experts = flat[slot_ids]
    order = torch.argsort(experts, stable=True)
    slot_ids = slot_ids[order]
    counts = torch.bincount(experts, minlength=num_experts)
    return SortedAssignments(slot_ids // indices_TK.shape[1], slot_ids, counts)


def experts_sorted(
    x_TD: torch.Tensor,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Same contract as :func:`moekit.experts.reference.experts_reference`.

    The weighted sum is accumulated in (at least) fp32 and cast back, so bf16 inputs lose no precision
    in the combine.
    """
    num_experts = w_in_EHD.shape[0]
    sa = sort_assignments(indices_TK, num_experts)
    x_ND = x_TD[sa.token_ids_N]
    w_N = weights_TK.reshape(-1)[sa.slot_ids_N]
    blocks = []
    for e, x_block in enumerate(torch.split(x_ND, sa.counts_E.tolist())):
        if x_block.shape[0]:
            blocks.append(expert_mlp(x_block, w_in_EHD[e], w_out_EDF[e], activation))
    acc_dtype = torch.promote_types(x_TD.dtype, torch.float32)
    out_TD = torch.zeros(x_TD.shape, dtype=acc_dtype, device=x_TD.device)
    if not blocks:
        # No token routed anywhere: zero, not missing, gradients for every input
        return connect(out_TD, x_TD, weights_TK, w_in_EHD, w_out_EDF).to(x_TD.dtype)
    y_ND = torch.cat(blocks).to(acc_dtype) * w_N.to(acc_dtype)[:, None]
    return out_TD.index_add(0, sa.token_ids_N, y_ND).to(x_TD.dtype)
