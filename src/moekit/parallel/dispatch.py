"""Pure index arithmetic of expert-parallel dispatch: logical experts -> physical slots ->
ranks, and the inverse combine. No communication here, so all of it is unit-testable on one
process.

Shapes: ``T`` tokens on this rank, ``K`` experts per token, ``E`` logical experts, ``R``
physical slots in the EP group, ``P`` ranks in the EP group, ``S = R / P`` slots per rank
(slot ``r`` lives on rank ``r // S``, EPLB's layout), ``M`` most replicas of one expert,
``N`` valid assignments sent by this rank, ``Q`` assignments received by this rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "SlotTables",
    "DispatchOrder",
    "TokenDispatch",
    "slot_tables",
    "dispatch_order",
    "token_dispatch",
    "received_slots",
    "received_routing",
    "combine",
]


class SlotTables(NamedTuple):
    """Placement of one layer as lookup tables (all int64, on the layer's device).

    phy2log_R: logical expert of each physical slot. log2phy_EM: slots of each expert in
    increasing order, padded with -1. logcnt_E: replicas per expert.
    """

    phy2log_R: torch.Tensor
    log2phy_EM: torch.Tensor
    logcnt_E: torch.Tensor

    @property
    def num_slots(self) -> int:
        return int(self.phy2log_R.shape[0])


def slot_tables(phy2log_R, num_experts: int, num_ranks: int, device=None) -> SlotTables:
    """Check one layer's ``phy2log`` (``[R]``) and derive ``log2phy`` / ``logcnt``.

    ``ValueError`` unless ``R`` is a multiple of ``num_ranks`` and every logical expert in
    ``[0, num_experts)`` has at least one slot.
    """
    p2l = torch.as_tensor(phy2log_R, device="cpu").detach()
    if p2l.ndim != 1 or p2l.dtype.is_floating_point or p2l.dtype == torch.bool:
        raise ValueError(f"phy2log: expected a 1-D integer tensor [R] for one layer, got "
                         f"{tuple(p2l.shape)} {p2l.dtype}")
    p2l = p2l.to(torch.int64)
    num_slots = p2l.shape[0]
    if num_slots < num_experts or num_slots % num_ranks:
        raise ValueError(f"phy2log: expected R >= num_experts={num_experts} slots and a multiple of "
                         f"the EP group size {num_ranks}, got R={num_slots}")
    if p2l.min() < 0 or p2l.max() >= num_experts:
        raise ValueError(f"phy2log: expected expert ids in [0, {num_experts}), got "
                         f"{int(p2l.min())}..{int(p2l.max())}")
    logcnt = torch.bincount(p2l, minlength=num_experts)
    if bool((logcnt == 0).any()):
        missing = torch.nonzero(logcnt == 0)[:, 0].tolist()
        raise ValueError(f"phy2log: expected every logical expert to have a slot, experts {missing} have none")
    # slots sorted by expert (stable, so replicas are numbered in slot order)
    order = torch.argsort(p2l, stable=True)
    start = torch.cumsum(logcnt, 0) - logcnt
    replica = torch.arange(num_slots, device="cpu") - start[p2l[order]]
    log2phy = torch.full((num_experts, int(logcnt.max())), -1, dtype=torch.int64, device="cpu")
    log2phy[p2l[order], replica] = order
    return SlotTables(p2l.to(device), log2phy.to(device), logcnt.to(device))


def _count(ids_N: torch.Tensor, size: int) -> torch.Tensor:
    """``[size]`` int64 occurrences of each id in ``[0, size)``. Unlike ``torch.bincount`` it
    does not read the maximum back to the host, so it never waits for the GPU."""
    return torch.zeros(size, dtype=torch.int64, device=ids_N.device).scatter_add_(0, ids_N, torch.ones_like(ids_N))


class DispatchOrder(NamedTuple):
    """This rank's assignments in send order (by physical slot, so by destination rank).

    All fields have the fixed length ``N = T * K``: the ``n`` valid assignments (``n`` =
    ``send_counts_PS.sum()``) come first, the unused ``-1`` slots last (slot id ``R``), so the
    dispatch needs no device-to-host sync before the counts are exchanged.

    token_ids_N: token of each assignment. flat_ids_N: index into the flattened ``[T * K]``
    routing (to pick its combine weight). slot_ids_N: physical slot of each assignment
    (non-decreasing). send_counts_PS: int64 ``[P, S]`` assignments sent to slot ``s`` of rank ``p``.
    """

    token_ids_N: torch.Tensor
    flat_ids_N: torch.Tensor
    slot_ids_N: torch.Tensor
    send_counts_PS: torch.Tensor


def dispatch_order(indices_TK: torch.Tensor, tables: SlotTables, num_ranks: int, rank: int) -> DispatchOrder:
    """Map each assignment to a physical slot and sort by slot.

    The assignments of a replicated expert are dealt round-robin over its replicas in token
    order, starting at replica ``rank % logcnt`` so that the remainders of different ranks
    land on different replicas: deterministic, and balanced to within one assignment per rank.
    """
    num_tokens, top_k = indices_TK.shape
    num_experts, num_slots = tables.logcnt_E.shape[0], tables.num_slots
    flat = indices_TK.reshape(-1)
    experts = torch.where(flat >= 0, flat, num_experts)  # unused slots sort last
    by_expert = torch.argsort(experts, stable=True)
    experts = experts[by_expert]
    counts_E = _count(experts, num_experts + 1)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    position = torch.arange(experts.shape[0], device=experts.device) - start_E[experts]
    real = experts.clamp(max=num_experts - 1)
    replica = (position + rank) % tables.logcnt_E[real]
    slots = torch.where(experts < num_experts, tables.log2phy_EM[real, replica], num_slots)
    by_slot = torch.argsort(slots, stable=True)
    flat_ids, slots = by_expert[by_slot], slots[by_slot]
    send_counts = _count(slots, num_slots + 1)[:num_slots].view(num_ranks, -1)
    return DispatchOrder(flat_ids // top_k, flat_ids, slots, send_counts)


def received_slots(recv_counts_PS: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Local slot id ``[Q]`` of each received row: rows arrive source-rank by source-rank,
    each source's rows sorted by slot. ``total`` (``Q``, when known on the host) spares a
    device-to-host sync."""
    num_ranks, num_slots = recv_counts_PS.shape
    local = torch.arange(num_slots, device=recv_counts_PS.device).repeat(num_ranks)
    return torch.repeat_interleave(local, recv_counts_PS.reshape(-1), output_size=total)


def combine(y_ND: torch.Tensor, order: DispatchOrder, weights_TK: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum_n [token_n = t] * w_n * y_n`` over the first ``n = len(y_ND)`` (valid)
    assignments of ``order``: ``[T, D]`` in ``y_ND.dtype``, summed in at least fp32 (bf16
    outputs lose no precision in the combine). Differentiable in ``y_ND`` and the weights."""
    num = y_ND.shape[0]
    acc = torch.promote_types(y_ND.dtype, torch.float32)
    w_N = weights_TK.reshape(-1)[order.flat_ids_N[:num]].to(acc)
    out_TD = torch.zeros(weights_TK.shape[0], y_ND.shape[1], dtype=acc, device=y_ND.device)
    return out_TD.index_add(0, order.token_ids_N[:num], y_ND.to(acc) * w_N[:, None]).to(y_ND.dtype)


class TokenDispatch(NamedTuple):
    """Deduplicated dispatch: each token travels once to each rank holding any of its slots
    (``U`` rows instead of ``n`` assignments; the receiver weights and sums its slots' outputs
    per row, so the combine also returns ``U`` rows).

    Fixed length ``N = T * K`` like :class:`DispatchOrder`: the first ``U`` entries of
    ``token_ids_N`` and the first ``n`` entries of the per-assignment fields are valid (both
    counts are in ``send_counts_P2``), so no device-to-host sync is needed to build it.

    token_ids_N: token of each sent row, sorted by (destination rank, token).
    row_N: row of each assignment, counted from the start of its destination's rows.
    slot_N: the assignment's slot, local to its destination rank.
    flat_ids_N: index into the flattened ``[T * K]`` routing (its weight).
    send_counts_P2: int64 ``[P, 2]``, rows and assignments sent to each rank.
    """

    token_ids_N: torch.Tensor
    row_N: torch.Tensor
    slot_N: torch.Tensor
    flat_ids_N: torch.Tensor
    send_counts_P2: torch.Tensor


def token_dispatch(order: DispatchOrder, num_tokens: int, num_ranks: int) -> TokenDispatch:
    """Group the assignments of ``order`` into one row per (destination rank, token)."""
    slots_per_rank = order.send_counts_PS.shape[1]
    stride = max(num_tokens, 1)
    dst_N = order.slot_ids_N // slots_per_rank  # == num_ranks for unused slots (slot id R)
    key_N = dst_N * stride + order.token_ids_N
    by_key = torch.argsort(key_N, stable=True)  # by destination, then token: rows in token order
    key_N, dst_N = key_N[by_key], dst_N[by_key]
    first_N = torch.ones_like(key_N, dtype=torch.bool)
    first_N[1:] = key_N[1:] != key_N[:-1]
    first_N &= dst_N < num_ranks
    row_N = torch.cumsum(first_N, 0) - 1  # global row of each (valid) assignment
    rows_P = _count(torch.where(first_N, dst_N, num_ranks), num_ranks + 1)[:num_ranks]
    assign_P = _count(dst_N, num_ranks + 1)[:num_ranks]
    # compact the row keys without a sync: non-first entries all write to a spare last cell
    num = key_N.shape[0]
    token_ids = torch.zeros(num + 1, dtype=torch.int64, device=key_N.device)
    token_ids.scatter_(0, torch.where(first_N, row_N, num), key_N % stride)
    row_start_P = torch.cumsum(rows_P, 0) - rows_P
    return TokenDispatch(
        token_ids_N=token_ids[:num],
        row_N=row_N - row_start_P[dst_N.clamp(max=num_ranks - 1)],
        slot_N=order.slot_ids_N[by_key] % slots_per_rank,
        flat_ids_N=order.flat_ids_N[by_key],
        send_counts_P2=torch.stack([rows_P, assign_P], 1),
    )


def received_routing(recv_counts_P2: torch.Tensor, row_A: torch.Tensor, slot_A: torch.Tensor,
                     weights_A: torch.Tensor, top_k: int, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing of the ``num_rows`` received rows over this rank's slots:
    ``indices_UK`` (local slot, ``-1`` padded) and ``weights_UK`` (differentiable in
    ``weights_A``), ready for an expert backend. Inputs as received (``A`` assignments):
    source-rank major, each source's assignments in row order (``row_A`` counted from that
    source's first row)."""
    num_ranks = recv_counts_P2.shape[0]
    num_assign = row_A.shape[0]
    src_A = torch.repeat_interleave(torch.arange(num_ranks, device=row_A.device), recv_counts_P2[:, 1],
                                    output_size=num_assign)
    row_start_P = torch.cumsum(recv_counts_P2[:, 0], 0) - recv_counts_P2[:, 0]
    row_A = row_A + row_start_P[src_A]
    per_row_U = _count(row_A, num_rows)
    col_A = torch.arange(num_assign, device=row_A.device) - (torch.cumsum(per_row_U, 0) - per_row_U)[row_A]
    indices_UK = torch.full((num_rows, top_k), -1, dtype=torch.int64, device=row_A.device)
    indices_UK[row_A, col_A] = slot_A
    weights_UK = weights_A.new_zeros(num_rows, top_k).index_put((row_A, col_A), weights_A)
    return indices_UK, weights_UK
