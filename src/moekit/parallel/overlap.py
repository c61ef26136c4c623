"""Expert-parallel dispatch with the rank's own tokens computed beside the exchange (``overlap``).

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

With the fixed-size dispatch (``max_tokens_per_rank = C``, :func:`overlapped_fixed_forward`)
step 2 sends this rank's ``C`` padded rows to every *other* rank (not to itself) and there is
no host sync at all: the host queues the whole step, and the side stream's own-token experts
run beside the all-to-alls and the other ranks' rows.

With ``remote_first`` (both dispatches) the exchanged rows' path (all-to-alls, the experts on
the received rows, the combine) runs on a third, **high-priority** CUDA stream instead of the
main one. Two streams of equal priority share the SMs block by block, so the own tokens'
experts (the bigger share for ``P = 2``) may finish first and leave the return all-to-all
alone at the end; with the remote path ahead at every kernel boundary, its return
all-to-all runs while the own tokens' experts are still computing. Autograd runs the
backward on the same streams, so the same holds there.

Both expert calls of a forward read the same weights. With ``join_weight_grads`` (the
default) they share a :class:`~moekit.experts.join.WeightGradJoin`: whichever call's backward
runs second accumulates its weight gradient into the first one's (the K-grouped GEMM adds in
its epilogue), so the backward writes one weight gradient, not two that autograd then adds.

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
from moekit.parallel.dispatch import _count, _rows_by_destination
from moekit.parallel.rows import collect, pad_rows, spread, sum_partials

__all__ = ["RemoteRows", "overlapped_fixed_forward", "overlapped_forward", "remote_rows", "row_routing"]


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
    dst_TK = torch.where(slot_TK >= 0, slot_TK // slots_per_rank, num_ranks)
    dst_TK = torch.where(dst_TK == rank, num_ranks, dst_TK)  # own choices: computed in place
    _, rows_P, inv_PT, target_F, token_ids_V = _rows_by_destination(dst_TK, num_ranks)
    spare = target_F.shape[0]
    dst_ids = torch.full((spare + 1,), num_ranks, dtype=torch.int64, device=slot_TK.device).scatter_(
        0, target_F, torch.arange(num_ranks, device=slot_TK.device).repeat_interleave(slot_TK.shape[0]))
    assign_P = _count(dst_TK.reshape(-1), num_ranks + 1)[:num_ranks]
    return RemoteRows(token_ids_V, dst_ids[:spare], inv_PT.t().contiguous(), torch.stack([rows_P, assign_P], 1))


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


def _remote_stream(module, x_TD: torch.Tensor, read: tuple[torch.Tensor, ...]):
    """With ``module.remote_first`` on CUDA: the module's high-priority stream for the
    exchanged rows' path, made to wait for the main stream's work so far; ``read`` (tensors of
    the main stream it reads) kept alive until it did. Otherwise ``None`` (the main stream:
    ``torch.cuda.stream(None)`` is a no-op)."""
    if not module.remote_first or x_TD.device.type != "cuda":
        return None
    key = (x_TD.device, "remote")
    if key not in module._side_streams:
        # negative = above the default priority 0 of the main and the side stream
        module._side_streams[key] = torch.cuda.Stream(x_TD.device, priority=-1)
    remote = module._side_streams[key]
    remote.wait_stream(torch.cuda.current_stream(x_TD.device))
    for t in read:
        t.record_stream(remote)
    return remote


def _join_remote(y_TD: torch.Tensor, remote) -> torch.Tensor:
    """The main stream waits for the remote path's stream (``None``: it ran on the main one),
    whose output ``y_TD`` it then reads."""
    if remote is not None:
        main = torch.cuda.current_stream(y_TD.device)
        main.wait_stream(remote)
        y_TD.record_stream(main)
    return y_TD


def _mark(x_TD: torch.Tensor):
    """An event recorded on the current CUDA stream now (``None`` off CUDA): where the side
    stream may start when the main stream has queued more work since."""
    if x_TD.device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(x_TD.device))
    return event


def _start_own(module, x_TD: torch.Tensor, own_TK: torch.Tensor, weights_TK: torch.Tensor, join, after=None):
    """Launch this rank's own choices on the expert backend: on CUDA on the side stream, after
    the main stream's work so far (or only after the event ``after`` from :func:`_mark`: work
    queued since, such as all-to-alls, is not waited for), so that what the main stream does
    next runs beside it. ``join``: the forward's weight-gradient join (``module.new_join()``).
    Returns ``(y_own_TD, streams)``; pass both to :func:`_finish`."""
    if x_TD.device.type != "cuda":
        return module.local_call(x_TD, own_TK, weights_TK, join), None
    main, side = torch.cuda.current_stream(x_TD.device), _side_stream(module, x_TD.device)
    if after is None:
        side.wait_stream(main)
    else:
        side.wait_event(after)
    with torch.cuda.stream(side):
        y_own = module.local_call(x_TD, own_TK, weights_TK, join)
    for t in (x_TD, own_TK, weights_TK):  # read on the side stream: keep their memory until it did
        t.record_stream(side)
    return y_own, (main, side)


def _finish(y_remote_TD: torch.Tensor, y_own_TD: torch.Tensor, streams) -> torch.Tensor:
    """``y_remote + y_own`` on the main stream, after it waited for the side stream."""
    if streams is not None:
        main, side = streams
        main.wait_stream(side)
        y_own_TD.record_stream(main)
    return y_remote_TD + y_own_TD


def overlapped_forward(module, x_TD: torch.Tensor, indices_TK: torch.Tensor,
                       weights_TK: torch.Tensor) -> torch.Tensor:
    """The ``overlap=True`` forward of an :class:`~moekit.parallel.ExpertParallelExperts`
    ``module`` with the deduplicated dispatch (module docstring): ``[T, D]``. Collective over
    ``module.group``; one host sync (the split sizes)."""
    per, num_ranks, rank, group = module.slots_per_rank, module.num_ranks, module.rank, module.group
    slot_TK = module.physical_slots(indices_TK)
    rows = remote_rows(slot_TK, rank, num_ranks, per)
    recv_counts_P2 = exchange_counts(rows.send_counts_P2, group)
    # own tokens' experts queued before the host sync, which then waits for the main stream only
    join = module.new_join()
    y_own, streams = _start_own(module, x_TD, module.local_of(slot_TK), weights_TK, join)
    send_rows, _send_assign, recv_rows, recv_assign = torch.cat(
        [rows.send_counts_P2.t(), recv_counts_P2.t()]).tolist()
    num_rows = sum(send_rows)
    token_V = rows.token_ids_V[:num_rows]
    remote = _remote_stream(module, x_TD, (x_TD, slot_TK, weights_TK, rows.token_ids_V, rows.dst_V, rows.inv_TP))
    with torch.cuda.stream(remote):
        slots_VK, weights_VK = row_routing(slot_TK, weights_TK, rows, num_rows, per)
        x_recv = all_to_all(module._sendable(spread(x_TD, token_V, rows.inv_TP)), recv_rows, send_rows, group)
        slots_UK = all_to_all_plain(slots_VK, recv_rows, send_rows, group)
        weights_UK = all_to_all(module._sendable(weights_VK), recv_rows, send_rows, group)
        y_recv = module._compute_local(x_recv, slots_UK, weights_UK, sum(recv_assign), join)
        y_back = all_to_all(y_recv, send_rows, recv_rows, group)
        y_remote = collect(y_back, token_V, rows.inv_TP)
    return _finish(_join_remote(y_remote, remote), y_own, streams)


def overlapped_fixed_forward(module, x_TD: torch.Tensor, indices_TK: torch.Tensor,
                             weights_TK: torch.Tensor) -> torch.Tensor:
    """The ``overlap=True`` forward with the fixed-size dispatch (``max_tokens_per_rank = C``):
    no host sync at all. The own choices run beside (side stream); this rank's ``C`` padded
    rows, their global slots and weights go to every *other* rank (``(P - 1) * C`` rows
    received), each rank computes the received choices on its slots (``-1`` elsewhere) and
    returns the partial sums, which the token's rank adds to its own. ``[T, D]``."""
    num_tokens = indices_TK.shape[0]
    cap, num_ranks, rank = module.max_tokens_per_rank, module.num_ranks, module.rank
    if num_tokens > cap:
        raise ValueError(f"x: {num_tokens} tokens on rank {rank}, more than max_tokens_per_rank={cap}")
    slot_TK = module.physical_slots(indices_TK)
    own_TK = module.local_of(slot_TK)
    copies = num_ranks - 1
    if copies == 0:
        y_own, streams = _start_own(module, x_TD, own_TK, weights_TK, None)
        return _finish(torch.zeros_like(y_own), y_own, streams)
    join = module.new_join()
    if module.own_first:  # the first expert GEMM as early as possible; the exchange's launches follow
        y_own, streams = _start_own(module, x_TD, own_TK, weights_TK, join)
    inputs_ready = _mark(x_TD)
    remote = _remote_stream(module, x_TD, (x_TD, slot_TK, weights_TK))
    with torch.cuda.stream(remote):
        x_QD, slot_QK, w_QK = module.gather_fixed(False, *pad_rows(cap, x_TD, slot_TK, weights_TK))
    if not module.own_first:
        # own choices on the side stream, launched after the all-to-alls (which so hold their
        # SMs before the expert GEMMs fill the GPU) and not waiting for them
        y_own, streams = _start_own(module, x_TD, own_TK, weights_TK, join, after=inputs_ready)
    with torch.cuda.stream(remote):
        y_QD = module.local_call(x_QD, module.local_of(slot_QK), w_QK, join)
        # block q of what comes back: other rank q's partial sums for this rank's C rows
        y_back = module.swap_fixed(False, y_QD)
        y_remote = sum_partials(y_back, copies, cap, num_tokens, x_TD.dtype)
    return _finish(_join_remote(y_remote, remote), y_own, streams)
