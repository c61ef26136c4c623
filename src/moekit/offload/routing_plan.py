"""One MoE layer call's routing, worked out on the host, and the experts' outputs summed in the
plain model's order with a fixed number of device operations.

The engine reads a layer's routing choices ``indices_TK [T, k]`` to the host anyway (it must,
to know which experts to copy). :func:`plan_routing` then derives from them, with numpy, what
``transformers``' eager expert loop derives on the device expert by expert: the tokens of each
expert (an argsort and a floor division per expert there). Its index arrays go to the device in
one copy (:attr:`RoutingPlan.index`), and the engine then

- gathers the rows of every assignment, sorted by expert, once: ``x_ND = x_TD[tok_N]`` and
  ``w_N = weights_TK.flatten()[flat_N]`` (``N`` valid assignments);
- computes each expert on its contiguous block ``x_ND[starts[e]:starts[e + 1]]`` (a view) and
  writes ``expert(x) * w`` into the same rows of ``y_ND`` (:func:`write_expert_rows`);
- sums with :func:`combine_in_expert_order`: ``out_TD = 0``, then for ``j = 0 .. k-1``
  ``out_TD += y_ND[comb_KT[j]]``, ``comb_KT[j, t]`` being the row of token ``t``'s ``j``-th
  assignment in ascending expert order (a zero row where it has fewer than ``j + 1``). Every
  token therefore receives the same additions in the same order, with the same rounding, as in
  the eager loop (``out[tok_e] += y_e`` for ascending ``e``): the results are bit-identical
  (:func:`experts_output_reference` is that loop; tests compare the two).

That is ``2 + 2k`` device operations per layer call plus five per expert, against about a
dozen per expert (and ten for counting) before: at batch 1 on the Mixtral-8x7B config the
launches, not the device, set the pace of a layer whose experts are resident.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["RoutingPlan", "SMALL", "expert_forward", "plan_routing", "write_expert_rows", "combine_in_expert_order",
           "experts_output_reference"]


@dataclass(frozen=True)
class RoutingPlan:
    """The routing of one layer call (host data).

    counts_E: tokens per expert (``E`` ints). starts_E1: ``E + 1`` offsets, expert ``e``'s
    assignments being rows ``starts_E1[e]:starts_E1[e + 1]`` of the expert-sorted order.
    index: one CPU int64 tensor ``[tok_N, flat_N, comb_KT.ravel()]`` (one host-to-device copy):
    token and flat position ``t * k + j`` of each of the ``N`` valid assignments, sorted by
    expert (stable: ascending position within an expert), and ``comb_KT [k, T]``, the row of
    token ``t``'s ``j``-th assignment in ascending expert order, ``N`` (a zero row) where the
    token has fewer valid assignments. needs_zero_row: whether any entry of ``comb_KT`` is ``N``.
    """

    counts_E: list[int]
    starts_E1: list[int]
    index: torch.Tensor
    num_tokens: int
    top_k: int
    needs_zero_row: bool

    @property
    def num_assignments(self) -> int:
        return self.starts_E1[-1]

    @property
    def tok_N(self) -> torch.Tensor:
        return self.index[:self.num_assignments]

    @property
    def flat_N(self) -> torch.Tensor:
        n = self.num_assignments
        return self.index[n:2 * n]

    @property
    def comb_KT(self) -> torch.Tensor:
        return self.index[2 * self.num_assignments:].view(self.top_k, self.num_tokens)

    def needed(self) -> list[int]:
        """Experts with at least one token, ascending."""
        return [e for e, c in enumerate(self.counts_E) if c > 0]


SMALL = 1024  # up to this many assignments (decoding) plain Python beats numpy's per-call cost


def plan_routing(flat_indices: list[int] | np.ndarray, top_k: int, num_experts: int) -> RoutingPlan:
    """The :class:`RoutingPlan` of ``flat_indices`` (``T * top_k`` expert ids, row-major
    ``[T, k]``); ids outside ``[0, num_experts)`` (padding) are left out. Plain Python up to
    :data:`SMALL` assignments, numpy above (the same plan: a test compares them)."""
    if top_k < 1 or num_experts < 1:
        raise ValueError(f"top_k / num_experts: expected positive integers, got {top_k} / {num_experts}")
    if len(flat_indices) % top_k:
        raise ValueError(f"flat_indices: expected a multiple of top_k={top_k} entries, got {len(flat_indices)}")
    if len(flat_indices) <= SMALL:
        return _plan_python([int(e) for e in flat_indices], top_k, num_experts)
    return _plan_numpy(np.asarray(flat_indices, dtype=np.int64).reshape(-1), top_k, num_experts)


def _plan_python(ids: list[int], top_k: int, num_experts: int) -> RoutingPlan:
    buckets: list[list[int]] = [[] for _ in range(num_experts)]
    for p, e in enumerate(ids):
        if 0 <= e < num_experts:
            buckets[e].append(p)
    flat = [p for b in buckets for p in b]
    starts = [0]
    for b in buckets:
        starts.append(starts[-1] + len(b))
    tokens, n = len(ids) // top_k, len(flat)
    tok = [p // top_k for p in flat]
    comb, seen = [n] * (top_k * tokens), [0] * tokens
    for row, t in enumerate(tok):  # the expert-sorted order meets a token's experts ascending
        comb[seen[t] * tokens + t] = row
        seen[t] += 1
    index = torch.tensor(tok + flat + comb, dtype=torch.int64)
    return RoutingPlan([len(b) for b in buckets], starts, index, tokens, top_k, n < tokens * top_k)


def _plan_numpy(ids: np.ndarray, top_k: int, num_experts: int) -> RoutingPlan:
    tokens = ids.shape[0] // top_k
    keyed = np.where((ids >= 0) & (ids < num_experts), ids, num_experts)  # padding sorts last, cut off
    counts = np.bincount(keyed, minlength=num_experts + 1)[:num_experts]
    n = int(counts.sum())
    flat = np.argsort(keyed, kind="stable")[:n]
    starts = np.zeros(num_experts + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    tok = flat // top_k
    comb = np.full((top_k, tokens), n, dtype=np.int64)
    if n:
        by_tok = np.argsort(tok, kind="stable")  # rows grouped by token, ascending expert within
        tok_sorted = tok[by_tok]
        rank = np.arange(n) - np.searchsorted(tok_sorted, tok_sorted, side="left")
        comb[rank, tok_sorted] = by_tok
    index = torch.from_numpy(np.concatenate([tok, flat, comb.ravel()]))
    return RoutingPlan(counts.tolist(), starts.tolist(), index, tokens, top_k, n < tokens * top_k)


def expert_forward(x_ND: torch.Tensor, w_in_HD: torch.Tensor, w_out_DF: torch.Tensor, act_fn: Callable) -> torch.Tensor:
    """One SwiGLU expert ``[N, D] -> [N, D]`` (``w_in_HD [2F, D]`` = gate rows then up rows,
    ``w_out_DF [D, F]``), as ``transformers``' eager expert computes it."""
    gate_NF, up_NF = F.linear(x_ND, w_in_HD).chunk(2, dim=-1)
    return F.linear(act_fn(gate_NF) * up_NF, w_out_DF)


def write_expert_rows(y_ND: torch.Tensor, x_ND: torch.Tensor, w_N1: torch.Tensor, w_in_HD: torch.Tensor,
                      w_out_DF: torch.Tensor, act_fn: Callable) -> None:
    """``y_ND = expert(x_ND) * w_N1`` in place (:func:`expert_forward`), rounded once to
    ``y_ND``'s dtype as ``(expert(x) * w).to(dtype)`` would be."""
    torch.mul(expert_forward(x_ND, w_in_HD, w_out_DF, act_fn), w_N1, out=y_ND)


def combine_in_expert_order(y_ND1: torch.Tensor, comb_KT: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``out_TD``: for each token the sum of its rows of ``y_ND1`` (``[N + 1, D]``, row ``N``
    zero or unused), added one at a time in ``comb_KT``'s order (``[k, T]`` device int64) onto
    zeros: the additions, and so the rounding, of the eager loop."""
    out_TD = torch.zeros((num_tokens, y_ND1.shape[1]), dtype=y_ND1.dtype, device=y_ND1.device)
    for j in range(comb_KT.shape[0]):
        out_TD += y_ND1.index_select(0, comb_KT[j])
    return out_TD


def experts_output_reference(x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                             w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor, act_fn: Callable) -> torch.Tensor:
    """The slow, obviously-correct sum: for each expert in ascending order, its tokens' outputs
    times their combine weights added onto ``out_TD`` (``transformers``' eager expert loop; ids
    outside ``[0, E)`` are skipped)."""
    num_experts = w_in_EHD.shape[0]
    out_TD = torch.zeros_like(x_TD)
    for e in range(num_experts):
        tok, pos = torch.nonzero(indices_TK == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        gate, up = F.linear(x_TD[tok], w_in_EHD[e]).chunk(2, dim=-1)
        y = F.linear(act_fn(gate) * up, w_out_EDF[e]) * weights_TK[tok, pos, None]
        out_TD[tok] += y.to(out_TD.dtype)
    return out_TD
