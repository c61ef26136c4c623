"""Deduplicated dispatch with the rank's own tokens computed beside the exchange (``overlap``).

The plain deduplicated forward of :class:`moekit.parallel.ExpertParallelExperts` runs, in
order: count exchange, **host sync** (split sizes), dispatch all-to-all, the local experts on
the received rows, combine all-to-all. The GPU drains at the sync and then waits for the host
to launch the next kernels, and it idles again while the all-to-alls are in flight. Here:

1. the choices of this rank's tokens that fall on this rank's own slots never travel: they run
   on the expert backend directly from ``x_TD`` (``-1`` for every other choice), **on a side
   CUDA stream**, launched *before* the host sync;
2. only the rows for other ranks are dispatched (one row per (token, other rank)), each with
   its ``[K]`` local slots (``-1`` = a choice on another rank) and routing weights beside it, so
   the receiver needs no routing reconstruction: the received ``[U, K]`` slots and weights are
   the routing of its rows;
3. the host sync (``tolist`` of the counts on the main stream) waits only for the main stream,
   while the GPU works on the own-token experts; the dispatch all-to-all, the experts of the
   received rows and the combine all-to-all run on the main stream (NCCL waits for the main
   stream only), overlapping the side stream's expert GEMMs;
4. ``y = collect(returned partial sums) + y_own`` after the main stream waited for the side.

Autograd runs each backward op on the stream of its forward op (PyTorch's stream semantics of
backward), so in the backward the own-token expert gradients run on the side stream beside the
all-to-alls of the remote rows' gradients, with no custom backward.

The result, and every gradient, is the same sum as the other dispatch modes (the tests compare
all of them with the single-process layer). On CPU (gloo) there are no streams: the same
computation runs in order.

Shapes: ``T`` tokens on this rank, ``K`` choices per token, ``P`` ranks, ``S`` slots per rank,
``V = T * P`` sent-row capacity (``U`` valid), ``D`` model width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moekit.parallel.comm import all_to_all, all_to_all_plain, exchange_counts
from moekit.parallel.dispatch import _count, _cumsum_rows, assignment_slots
from moekit.parallel.rows import collect, spread

__all__ = ["RemoteRows", "overlapped_forward", "remote_rows", "row_routing"]


class RemoteRows(NamedTuple):
    """One row per (token, *other* rank holding one of its choices), grouped by destination,
    each destination's rows in token order. Fixed sizes (no host sync to build it).

    token_ids_V: ``[T*P]`` token of each row (the first ``U = send_counts_P2[:, 0].sum()``
    valid). dst_V: ``[T*P]`` destination rank of each row (``P`` past the valid rows).
    inv_TP: ``[T, P]`` row of (token, destination) or ``-1`` (always ``-1`` in this rank's
    column): the inverse of ``token_ids_V``. send_counts_P2: int64 ``[P, 2]`` rows and
    assignments (choices) sent to each rank (zero for this rank).
    """

    token_ids_V: torch.Tensor
    dst_V: torch.Tensor
    inv_TP: torch.Tensor
    send_counts_P2: torch.Tensor


def remote_rows(slot_TK: torch.Tensor, rank: int, num_ranks: int, slots_per_rank: int) -> RemoteRows:
    """Rows for the choices of ``slot_TK`` (physical slots, ``-1`` = none) that live on other
    ranks than ``rank`` (slot ``r`` lives on rank ``r // slots_per_rank``). Counting sort over
    the few ranks, laid out rank-major (one 1-D scan), no sort."""
    num_tokens = slot_TK.shape[0]
    dev = slot_TK.device
    dst_TK = torch.where(slot_TK >= 0, slot_TK // slots_per_rank, num_ranks)
    dst_TK = torch.where(dst_TK == rank, num_ranks, dst_TK)  # own choices: computed in place
    has_PT = torch.zeros(num_ranks + 1, num_tokens, dtype=torch.bool, device=dev).scatter_(
        0, dst_TK.t(), True)[:num_ranks]
    row_in_dst_PT = _cumsum_rows(has_PT) - 1
    rows_P = has_PT.sum(1)
    row_start_P = torch.cumsum(rows_P, 0) - rows_P
    inv_PT = torch.where(has_PT, row_in_dst_PT + row_start_P[:, None], -1)
    spare = num_tokens * num_ranks  # non-rows all write one discarded last cell
    target = torch.where(has_PT, inv_PT, spare).reshape(-1)
    token_ids = torch.zeros(spare + 1, dtype=torch.int64, device=dev).scatter_(
        0, target, torch.arange(num_tokens, device=dev).repeat(num_ranks))
    dst_ids = torch.full((spare + 1,), num_ranks, dtype=torch.int64, device=dev).scatter_(
        0, target, torch.arange(num_ranks, device=dev).repeat_interleave(num_tokens))
    assign_P = _count(dst_TK.reshape(-1), num_ranks + 1)[:num_ranks]
    return RemoteRows(token_ids[:spare], dst_ids[:spare], inv_PT.t().contiguous(),
                      torch.stack([rows_P, assign_P], 1))


def row_routing(slot_TK: torch.Tensor, weights_TK: torch.Tensor, rows: RemoteRows, num_rows: int,
                slots_per_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing of the first ``num_rows`` rows of ``rows`` as their destinations see it:
    ``slots_VK`` (the destination's local slot of each choice, ``-1`` for choices on other
    ranks) and ``weights_VK`` (their routing weights, ``0`` elsewhere; differentiable in
    ``weights_TK``, gradient a gather-sum through ``inv_TP``)."""
    token_V, dst_V = rows.token_ids_V[:num_rows], rows.dst_V[:num_rows]
    slot_VK = slot_TK.index_select(0, token_V)
    keep_VK = (slot_VK >= 0) & (slot_VK // slots_per_rank == dst_V[:, None])
    slots_VK = torch.where(keep_VK, slot_VK - dst_V[:, None] * slots_per_rank, -1)
    weights_VK = torch.where(keep_VK, spread(weights_TK, token_V, rows.inv_TP), 0.0)
    return slots_VK, weights_VK


def _side_stream(module, device: torch.device):
    """The module's side CUDA stream on ``device`` (made once, kept on the module)."""
    streams = module._side_streams
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


def overlapped_forward(module, x_TD: torch.Tensor, indices_TK: torch.Tensor,
                       weights_TK: torch.Tensor) -> torch.Tensor:
    """The ``overlap=True`` forward of an :class:`~moekit.parallel.ExpertParallelExperts`
    ``module`` (module docstring): ``[T, D]``. Collective over ``module.group``."""
    per, num_ranks, rank, group = module.slots_per_rank, module.num_ranks, module.rank, module.group
    slot_TK = assignment_slots(indices_TK, module.tables, rank, module.replicated)
    own_TK = slot_TK - rank * per
    own_TK = torch.where((own_TK >= 0) & (own_TK < per), own_TK, -1)
    rows = remote_rows(slot_TK, rank, num_ranks, per)
    recv_counts_P2 = exchange_counts(rows.send_counts_P2, group)

    cuda = x_TD.device.type == "cuda"
    if cuda:  # own tokens' experts on the side stream, queued before the host sync
        main, side = torch.cuda.current_stream(x_TD.device), _side_stream(module, x_TD.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            y_own = module.local(x_TD, own_TK, weights_TK)
        for t in (x_TD, own_TK, weights_TK):  # read on the side stream: keep their memory
            t.record_stream(side)
    else:
        y_own = module.local(x_TD, own_TK, weights_TK)

    # the one host sync; on CUDA it waits for the main stream only (the side stream computes)
    send_rows, _send_assign, recv_rows, recv_assign = torch.cat(
        [rows.send_counts_P2.t(), recv_counts_P2.t()]).tolist()
    num_rows = sum(send_rows)
    token_V = rows.token_ids_V[:num_rows]
    slots_VK, weights_VK = row_routing(slot_TK, weights_TK, rows, num_rows, per)
    x_recv = all_to_all(module._sendable(spread(x_TD, token_V, rows.inv_TP)), recv_rows, send_rows, group)
    slots_UK = all_to_all_plain(slots_VK, recv_rows, send_rows, group)
    weights_UK = all_to_all(module._sendable(weights_VK), recv_rows, send_rows, group)
    y_recv = module._compute_local(x_recv, slots_UK, weights_UK, sum(recv_assign))
    y_back = all_to_all(y_recv, send_rows, recv_rows, group)
    y_TD = collect(y_back, token_V, rows.inv_TP)
    if cuda:
        main.wait_stream(side)
        y_own.record_stream(main)
    return y_TD + y_own
