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
    "RowDispatch",
    "slot_tables",
    "assignment_slots",
    "dispatch_order",
    "row_dispatch",
    "local_slots",
    "lookup_tables",
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


def assignment_slots(indices_TK: torch.Tensor, tables: SlotTables, rank: int,
                     replicated: bool | None = None) -> torch.Tensor:
    """Physical slot ``[T, K]`` of each assignment (``-1`` where ``indices_TK`` is ``-1``).

    The assignments of a replicated expert are dealt round-robin over its replicas in token
    order, starting at replica ``rank % logcnt`` so that the remainders of different ranks
    land on different replicas: deterministic, and balanced to within one assignment per rank.
    replicated: whether any expert has more than one slot (``None``: read it from the tables,
    a device-to-host sync on GPU; the layer knows it on the host). Without replicas each
    assignment's slot is a table lookup, no sort.
    """
    num_experts = tables.logcnt_E.shape[0]
    flat = indices_TK.reshape(-1)
    valid = flat >= 0
    real = flat.clamp(min=0)
    if replicated is None:
        replicated = bool((tables.logcnt_E > 1).any())
    if not replicated:
        return torch.where(valid, tables.log2phy_EM[real, 0], -1).view(indices_TK.shape)
    experts = torch.where(valid, flat, num_experts)  # unused slots sort last
    by_expert = torch.argsort(experts, stable=True)
    experts = experts[by_expert]
    counts_E = _count(experts, num_experts + 1)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    position = torch.arange(experts.shape[0], device=experts.device) - start_E[experts]
    real_sorted = experts.clamp(max=num_experts - 1)
    replica = (position + rank) % tables.logcnt_E[real_sorted]
    slots = torch.where(experts < num_experts, tables.log2phy_EM[real_sorted, replica], -1)
    return torch.empty_like(slots).scatter_(0, by_expert, slots).view(indices_TK.shape)


def dispatch_order(indices_TK: torch.Tensor, tables: SlotTables, num_ranks: int, rank: int,
                   replicated: bool | None = None) -> DispatchOrder:
    """Map each assignment to a physical slot (:func:`assignment_slots`, ``replicated`` as
    there) and sort by slot (stably: within a slot, in token order)."""
    top_k = indices_TK.shape[1]
    num_slots = tables.num_slots
    slots = assignment_slots(indices_TK, tables, rank, replicated).reshape(-1)
    slots = torch.where(slots >= 0, slots, num_slots)  # unused slots sort last, with id R
    flat_ids = torch.argsort(slots, stable=True)
    slots = slots[flat_ids]
    send_counts = _count(slots, num_slots + 1)[:num_slots].view(num_ranks, -1)
    return DispatchOrder(flat_ids // top_k, flat_ids, slots, send_counts)


def local_slots(slot_TK: torch.Tensor, rank: int, slots_per_rank: int) -> torch.Tensor:
    """``[T, K]`` ``rank``'s local slot of each choice in ``slot_TK`` (physical slots, ``-1`` =
    none) that lives on ``rank``, ``-1`` for every other choice."""
    local_TK = slot_TK - rank * slots_per_rank  # out of [0, S) for -1 and other ranks' slots
    return torch.where((local_TK >= 0) & (local_TK < slots_per_rank), local_TK, -1)


def lookup_tables(tables: SlotTables, rank: int, slots_per_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two gather tables that turn the layer's slot arithmetic into one indexing kernel each
    (its host time sits before the first expert GEMM of a step; used by the deduplicated and
    the fixed-size dispatch):

    - ``slot_E1`` ``[E + 1]``: the first physical slot of each logical expert, ``-1`` at index
      ``E``. Without replicas ``slot_E1[indices_TK]`` equals :func:`assignment_slots` (``-1``
      choices wrap to the last entry, so ``-1`` stays ``-1``); with replicas the round-robin
      needs :func:`assignment_slots`.
    - ``local_R1`` ``[R + 1]``: ``rank``'s local slot of each physical slot, ``-1`` for the
      other ranks' slots and at index ``R``: ``local_R1[slot_TK]`` equals
      :func:`local_slots` for slots in ``[-1, R)``.

    Both int64, on the tables' device. Indices must lie in ``[-1, size)``: anything below
    ``-1`` would wrap to a real entry (the layer's routing contract marks "no expert" by ``-1``).
    """
    phy2log_R, log2phy_EM = tables.phy2log_R, tables.log2phy_EM
    none = torch.full((1,), -1, dtype=torch.int64, device=phy2log_R.device)
    slot_E1 = torch.cat([log2phy_EM[:, 0], none])
    local_R = local_slots(torch.arange(phy2log_R.shape[0], device=phy2log_R.device), rank, slots_per_rank)
    return slot_E1, torch.cat([local_R, none])


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


class RowDispatch(NamedTuple):
    """Deduplicated dispatch: each token travels once to each rank holding any of its slots
    (``U`` rows instead of ``n`` assignments; the receiver weights and sums its slots' outputs
    per row, so the combine also returns ``U`` rows). Fixed sizes, so no device-to-host sync
    is needed to build it; the valid counts are in ``send_counts_P2``.

    token_ids_V: ``[T*P]``, the token of each sent row (the first ``U`` are valid), rows
    grouped by destination rank, each destination's rows in token order.
    inv_TP: ``[T, P]`` the sent row of (token, destination) or ``-1``: the inverse of
    ``token_ids_V``, so that the combine and the input gradient are gather-sums (no atomics).
    perm_N: ``[T*K]`` index into the flattened ``[T * K]`` routing of each sent assignment
    (the first ``n`` valid), grouped by destination, each destination's in token order.
    meta_N: ``[T*K]`` per sent assignment ``row * S + local slot``, its row counted from the
    start of its destination's rows (what the destination needs to rebuild the routing).
    send_counts_P2: int64 ``[P, 2]``, rows and assignments sent to each rank.
    """

    token_ids_V: torch.Tensor
    inv_TP: torch.Tensor
    perm_N: torch.Tensor
    meta_N: torch.Tensor
    send_counts_P2: torch.Tensor


def _cumsum_rows(m_RN: torch.Tensor) -> torch.Tensor:
    """Inclusive int64 cumulative sum along each row of a few-row, long-row matrix, as one scan
    of the flattened matrix: a 1-D scan is one fast device-wide kernel, whereas a scan along
    dimension 0 of ``[N, R]`` runs one thread per column, serially over ``N`` (measured:
    9 ms for ``N = 131k``, ``R = 3`` on an H100)."""
    num_rows, num = m_RN.shape
    if num == 0:
        return torch.zeros(num_rows, 0, dtype=torch.int64, device=m_RN.device)
    flat_RN = torch.cumsum(m_RN.reshape(-1), 0, dtype=torch.int64).view(num_rows, num)
    before_R = torch.cat([flat_RN.new_zeros(1), flat_RN[:-1, -1]])
    return flat_RN - before_R[:, None]


def _rows_by_destination(dst_TK: torch.Tensor, num_ranks: int):
    """One row per (token, destination rank) of ``dst_TK`` (``[T, K]`` rank of each choice,
    ``num_ranks`` = no row), grouped by destination, each destination's rows in token order.
    Counting sort over the few ranks, laid out rank-major so that every scan is one 1-D scan.

    Returns ``row_in_dst_PT`` (row of (token, rank) counted within its rank), ``rows_P``,
    ``inv_PT`` (row of (token, rank) or ``-1``), ``target_F`` (``[P*T]`` row of each rank-major
    (rank, token) cell, ``T*P`` where there is none: scatter into ``T*P + 1`` cells and drop the
    last) and ``token_ids_V`` (``[T*P]``, the token of each row; valid up to ``rows_P.sum()``).
    """
    num_tokens = dst_TK.shape[0]
    dev = dst_TK.device
    has_PT = torch.zeros(num_ranks + 1, num_tokens, dtype=torch.bool, device=dev).scatter_(
        0, dst_TK.t(), True)[:num_ranks]
    row_in_dst_PT = _cumsum_rows(has_PT) - 1
    rows_P = has_PT.sum(1)
    row_start_P = torch.cumsum(rows_P, 0) - rows_P
    inv_PT = torch.where(has_PT, row_in_dst_PT + row_start_P[:, None], -1)
    spare = num_tokens * num_ranks  # every non-row cell writes to one spare last cell
    target_F = torch.where(has_PT, inv_PT, spare).reshape(-1)
    token_ids = torch.zeros(spare + 1, dtype=torch.int64, device=dev).scatter_(
        0, target_F, torch.arange(num_tokens, device=dev).repeat(num_ranks))
    return row_in_dst_PT, rows_P, inv_PT, target_F, token_ids[:spare]


def row_dispatch(slot_TK: torch.Tensor, num_ranks: int, slots_per_rank: int) -> RowDispatch:
    """Group the assignments of ``slot_TK`` (physical slots, ``-1`` = none, from
    :func:`assignment_slots`) into one row per (destination rank, token). Slot ``r`` lives on
    rank ``r // slots_per_rank``. Counting sorts over the few destination ranks (``Q = P + 1``
    rows: the ranks and one for unused entries), laid out rank-major so that every scan is
    one 1-D scan: no sort."""
    num_tokens, top_k = slot_TK.shape
    dev = slot_TK.device
    flat = slot_TK.reshape(-1)
    num = flat.shape[0]
    dst_N = torch.where(flat >= 0, flat // slots_per_rank, num_ranks)  # num_ranks = unused
    row_in_dst_PT, rows_P, inv_PT, _, token_ids_V = _rows_by_destination(dst_N.view(num_tokens, top_k),
                                                                          num_ranks)
    # assignments: stable counting sort by destination
    onehot_QN = torch.zeros(num_ranks + 1, num, dtype=torch.int32, device=dev).scatter_(0, dst_N[None], 1)
    assign = onehot_QN.sum(1, dtype=torch.int64)
    rank_in_dst_N = _cumsum_rows(onehot_QN).gather(0, dst_N[None])[0] - 1
    assign_start = torch.cumsum(assign, 0) - assign
    pos_N = torch.where(dst_N < num_ranks, assign_start[dst_N] + rank_in_dst_N, num)
    perm = torch.zeros(num + 1, dtype=torch.int64, device=dev)
    perm.scatter_(0, pos_N, torch.arange(num, device=dev))
    token_N = torch.arange(num, device=dev) // max(top_k, 1)
    row_local_N = row_in_dst_PT.reshape(-1)[dst_N.clamp(max=num_ranks - 1) * num_tokens + token_N]
    meta_flat = row_local_N * slots_per_rank + flat.clamp(min=0) % slots_per_rank
    perm_N = perm[:num]
    return RowDispatch(
        token_ids_V=token_ids_V,
        inv_TP=inv_PT.t().contiguous(),
        perm_N=perm_N,
        meta_N=meta_flat[perm_N],
        send_counts_P2=torch.stack([rows_P, assign[:num_ranks]], 1),
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
