"""The expert-parallel drop-in for :class:`moekit.experts.GroupedExperts`.

Each rank of the expert-parallel (EP) group holds ``S = R / P`` physical expert slots; slot
``r`` of the group lives on rank ``r // S`` and computes logical expert ``phy2log[r]``. The
forward keeps the ``GroupedExperts`` contract, ``(x_TD, indices_TK, weights_TK) -> y_TD``, so
:class:`moekit.MoE` runs unchanged with this module as its ``experts``:

1. map each (token, choice) to a physical slot (replicas of an expert share its tokens),
   sort by slot, exchange counts with the group;
2. ``all_to_all`` the token rows to the ranks holding their slots (differentiable);
3. run the local slots with the compute backend (``moekit.experts.get_backend``: the grouped
   GEMM on CUDA when present, the sorted loop on CPU);
4. ``all_to_all`` the outputs back (differentiable) and combine them on the token's rank.

Two dispatch modes give the same result. ``dedup=False`` (the simple reference) sends one row
per (token, choice) and applies the router weights on the token's rank. ``dedup=True`` (the
default) sends each token once per destination rank, with its choices' local slots and
weights beside it; the destination runs the backend with that routing (weights applied
there) and returns one partial sum per row: with top-k routing over few ranks this moves up
to ``k`` times fewer bytes through both all-to-alls.

The deduplicated path is kept lean, because at EP sizes of 2-8 the memory-bound glue around
the grouped GEMMs costs as much as the all-to-alls:

- one device-to-host sync per forward (the split sizes after the count exchange), none in
  the backward or in the replica gradient sums;
- no sort on the sender without replicas (slots are a table lookup; rows and assignments are
  grouped by destination with a counting sort over the ``P`` ranks);
- the rows sent are a gather of the tokens, and the combine their adjoint, a gather-sum over
  the ``<= P`` partial rows of each token (:mod:`moekit.parallel.rows`): no ``index_add``, no
  atomics, no fp32 copies or casts of the rows (fp32 accumulation happens in registers);
- on the grouped-GEMM backend only the valid (row, slot) entries of the received routing are
  gathered and computed (:func:`compact_grouped_experts`); the public backend would gather
  every ``-1`` entry of the padded ``[U, K]`` routing too.

Dropless dispatch with data-dependent sizes needs the split sizes on the host, and that sync
lets the GPU run dry: the host then has to launch the all-to-alls and the expert ops before
the GPU has work again. ``max_tokens_per_rank=C`` (every rank promises at most ``C`` tokens
per call) selects a third mode with sizes fixed in advance and **no host sync**: every rank
sends its ``C`` token rows (zero-padded), their slots and weights to every rank (an
all-gather done as an all-to-all), each rank computes the choices that fall on its own slots,
and the per-rank partial sums come back the same way and are added up (a reduce-scatter).
It moves ``P * C`` rows per rank whatever the routing, which costs little where nearly every
token has a choice on every rank (top-8 over 2-4 ranks) and more as ``P`` grows or ``k``
shrinks; it is the mode for small EP groups that are bound by host latency.

``transport="copy_engine"`` (fixed-size dispatch, CUDA ranks of one node) moves the rows of
those exchanges with the GPUs' copy engines through PyTorch's symmetric memory instead of NCCL
kernels (:mod:`moekit.parallel.copy_engine`): the copies need no SMs, so they run beside the
expert GEMMs of the overlap instead of waiting for them to end.

``overlap=True`` computes the choices of this rank's own tokens that fall on its own slots in
place, on a side CUDA stream, while only the other ranks' rows are exchanged and computed on
the main stream (:mod:`moekit.parallel.overlap`): the all-to-alls overlap expert GEMMs and, in
the deduplicated mode, the host sync no longer drains the GPU. It combines with either the
deduplicated or the fixed-size dispatch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moekit.experts import ExpertsConfig, GroupedExperts, resolve_backend
from moekit.experts.grouped import (  # also registers the moekit:: ops
    experts_grouped_mm,
    experts_grouped_sorted,
    grouped_mm_supported,
    route_by_expert,
)
from moekit.experts.join import WeightGradJoin
from moekit.parallel.carveout import carved_out, check_sm_carveout
from moekit.parallel.comm import (
    all_to_all,
    all_to_all_plain,
    exchange_counts,
    group_rank_size,
)
from moekit.parallel.copy_engine import CopyEngineExchange, gather_blocks, swap_blocks
from moekit.parallel.dispatch import (
    SlotTables,
    assignment_slots,
    combine,
    dispatch_order,
    lookup_tables,
    received_routing,
    received_slots,
    row_dispatch,
    slot_tables,
)
from moekit.parallel.overlap import overlapped_fixed_forward, overlapped_forward
from moekit.parallel.replicas import ReplicaSync, replica_sync
from moekit.parallel.rows import collect, pad_rows, spread, sum_partials

__all__ = ["ExpertParallelExperts"]


class ExpertParallelExperts(nn.Module):
    """``cfg.num_experts`` logical experts spread over the ranks of ``group``.

    cfg: the logical experts (``E = cfg.num_experts``). group: the EP process group (``P`` ranks).
    phy2log: ``[R]`` logical expert of each physical slot of the group (``R % P == 0``); ``None``
    means one slot per expert in order (needs ``E % P == 0``). expert_dp_group: ranks that hold
    the same slots for other data (EP combined with data parallelism across EP groups); their
    expert gradients are summed by :func:`moekit.parallel.reduce_gradients`. dedup: one row per
    (token, destination rank) instead of one per (token, choice). max_tokens_per_rank: the most
    tokens any rank passes in one call (the same on every rank); when set, the fixed-size,
    sync-free dispatch is used instead (module docstring). overlap: compute this rank's own
    tokens' local choices on a side stream beside the exchange of the others' rows
    (:mod:`moekit.parallel.overlap`; same results; with the deduplicated or the fixed-size
    dispatch). sm_carveout: SMs the layer's GEMMs leave free, in its forward and backward, so
    that the NCCL kernels running beside them (``overlap``) get SMs at once
    (:mod:`moekit.parallel.carveout`; ``None``: every SM; results unchanged). remote_first
    (with ``overlap``): the exchanged rows' path runs on a high-priority stream, so that its
    return all-to-all is not left alone at the end of the forward or backward.
    transport (with ``max_tokens_per_rank``): ``"all_to_all"`` (the process group's collective,
    NCCL or gloo), ``"copy_engine"`` (the GPUs' copy engines over symmetric memory, NCCL groups
    of one node; :mod:`moekit.parallel.copy_engine`) or a :class:`CopyEngineExchange` to share
    with other layers (one buffer and stream for all; :func:`moekit.parallel.parallelize` does so).
    join_weight_grads (overlap modes, grouped-GEMM backend): the two expert calls of a forward
    (own rows, received rows) make ONE weight gradient, the second call's weight-gradient GEMMs
    accumulating into the first's output, instead of two that autograd adds
    (:mod:`moekit.experts.join`; same results up to rounding order); no effect in other modes.
    own_first (overlap with ``max_tokens_per_rank``): the host launches this rank's own expert
    call before the dispatch exchange instead of after it, so that the GPU starts its first
    expert GEMM sooner after the step begins (the exchange's host work then runs beside that
    GEMM); same results. Meant for ``transport="copy_engine"``, whose copies need no SMs: NCCL's
    all-to-all kernels would wait for the persistent GEMM to end (:mod:`moekit.parallel.overlap`).
    Measured on 2x H200 (docs/results/expert-parallel.md, tenth run): no faster than the default
    order. It removes the GPU's wait for the exchange's launches, but the exchange's barrier
    kernels then wait for the persistent GEMM's SMs (306 us on average against 9 us).

    Parameters: ``local.w_in`` ``[S, H, D]`` and ``local.w_out`` ``[S, D, F]``, this rank's slots.
    Buffer ``phy2log`` ``[R]`` is saved in the state dict with them.
    """

    def __init__(self, cfg: ExpertsConfig, group, phy2log=None, expert_dp_group=None, dedup: bool = True,
                 max_tokens_per_rank: int | None = None, overlap: bool = False, sm_carveout: int | None = None,
                 remote_first: bool = False, transport: str | CopyEngineExchange = "all_to_all",
                 join_weight_grads: bool = True, own_first: bool = False):
        super().__init__()
        if not isinstance(join_weight_grads, bool):
            raise ValueError(f"join_weight_grads: expected True or False, got {join_weight_grads!r}")
        self.join_weight_grads = join_weight_grads
        if not isinstance(own_first, bool):
            raise ValueError(f"own_first: expected True or False, got {own_first!r}")
        if own_first and not (overlap and max_tokens_per_rank is not None):
            raise ValueError("own_first: expected False unless overlap=True with max_tokens_per_rank set (it orders "
                             "the launches of the fixed-size overlap), got own_first=True")
        self.own_first = own_first
        if remote_first and not overlap:
            raise ValueError("remote_first: expected False unless overlap=True (it orders the two streams of the "
                             "overlap), got remote_first=True with overlap=False")
        self.remote_first = bool(remote_first)
        self.sm_carveout = check_sm_carveout(sm_carveout)
        if overlap and not dedup:
            raise ValueError("overlap: expected False unless dedup=True (the per-assignment dispatch is the "
                             "simple reference), got overlap=True with dedup=False")
        if max_tokens_per_rank is not None and (isinstance(max_tokens_per_rank, bool)
                                                or not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < 1):
            raise ValueError(f"max_tokens_per_rank: expected a positive int or None, got {max_tokens_per_rank!r}")
        self.cfg = cfg
        self.dedup = dedup
        self.overlap = bool(overlap)
        self._side_streams: dict = {}  # CUDA side (and remote-path) streams per device (overlap mode)
        self.max_tokens_per_rank = max_tokens_per_rank
        self.group = group
        self.expert_dp_group = expert_dp_group
        self.rank, self.num_ranks = group_rank_size(group)
        self.exchange = _copy_engine(transport, group, max_tokens_per_rank)
        if phy2log is None:
            if cfg.num_experts % self.num_ranks:
                raise ValueError(f"phy2log: needed because num_experts={cfg.num_experts} is not a multiple of "
                                 f"the EP group size {self.num_ranks}")
            phy2log = torch.arange(cfg.num_experts, device="cpu")
        tables = slot_tables(phy2log, cfg.num_experts, self.num_ranks)
        self.slots_per_rank = tables.num_slots // self.num_ranks
        self.local = GroupedExperts(ExpertsConfig(cfg.dim, cfg.ffn_dim, self.slots_per_rank, cfg.activation,
                                                  cfg.backend))
        device = self.local.w_in.device  # where the weights went (e.g. under a torch.device context)
        self.register_buffer("phy2log", tables.phy2log_R.to(device))
        self.register_buffer("log2phy", tables.log2phy_EM.to(device), persistent=False)
        self.register_buffer("logcnt", tables.logcnt_E.to(device), persistent=False)
        # gather tables of the slot arithmetic (dispatch.lookup_tables): physical_slots, local_of
        slot_E1, local_R1 = lookup_tables(self.tables, self.rank, self.slots_per_rank)
        self.register_buffer("slot_E1", slot_E1, persistent=False)
        self.register_buffer("local_R1", local_R1, persistent=False)
        self._set_host_tables(tables.phy2log_R)

    # ----------------------------------------------------------------------------- placement
    @property
    def tables(self) -> SlotTables:
        return SlotTables(self.phy2log, self.log2phy, self.logcnt)

    @property
    def local_experts(self) -> torch.Tensor:
        """``[S]`` logical expert of each slot on this rank."""
        s = self.slots_per_rank
        return self.phy2log[self.rank * s:(self.rank + 1) * s]

    def set_placement(self, phy2log_R) -> None:
        """Replace the lookup tables (weights untouched: see :func:`moekit.parallel.apply_plan`)."""
        tables = slot_tables(phy2log_R, self.cfg.num_experts, self.num_ranks, self.phy2log.device)
        if tables.num_slots != self.phy2log.shape[0]:
            raise ValueError(f"phy2log: expected R={self.phy2log.shape[0]} slots like the current placement, "
                             f"got {tables.num_slots}")
        self.phy2log, self.log2phy, self.logcnt = tables
        self.slot_E1, self.local_R1 = lookup_tables(tables, self.rank, self.slots_per_rank)
        self._set_host_tables(tables.phy2log_R)

    def _set_host_tables(self, phy2log_R: torch.Tensor) -> None:
        """What the hot path needs on the host, derived once per placement (no syncs later):
        whether any expert is replicated, and the replica gradient reduction."""
        p2l = phy2log_R.cpu()
        self.replicated = bool((torch.bincount(p2l) > 1).any())
        self._replica_sync: ReplicaSync = replica_sync(p2l, self.rank, self.num_ranks)

    @torch.no_grad()
    def load_logical(self, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor) -> None:
        """Fill this rank's slots from the full logical weights ``[E, H, D]`` / ``[E, D, F]``."""
        e = self.local_experts.to(w_in_EHD.device)
        self.local.w_in.copy_(w_in_EHD[e])
        self.local.w_out.copy_(w_out_EDF[e])

    @torch.no_grad()
    def init_logical(self, seed: int) -> None:
        """Initialise every slot from a generator seeded by ``(seed, logical expert)``, so that
        replicas on different ranks start equal without communication."""
        w_in, w_out = self.local.w_in, self.local.w_out
        for s, e in enumerate(self.local_experts.tolist()):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + e)
            # Drawn on the CPU (explicitly, so a surrounding ``torch.device`` context cannot move
            # the draw) for the same numbers on every device, then copied into the slot.
            w_in[s].copy_(torch.randn(w_in.shape[1:], generator=gen, device="cpu") * self.cfg.dim ** -0.5)
            w_out[s].copy_(torch.randn(w_out.shape[1:], generator=gen, device="cpu") * self.cfg.ffn_dim ** -0.5)

    @torch.no_grad()
    def gather_logical(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full logical weights ``[E, H, D]`` / ``[E, D, F]`` on every rank (all-gather;
        for checkpoints and tests). Replicas are equal, so any one of them is taken."""
        out = []
        for w in (self.local.w_in, self.local.w_out):
            parts = [torch.empty_like(w) for _ in range(self.num_ranks)]
            dist.all_gather(parts, w.contiguous(), group=self.group)
            slots = torch.cat(parts)
            first_slot = self.log2phy[:, 0]
            out.append(slots[first_slot])
        return out[0], out[1]

    def physical_slots(self, indices_TK: torch.Tensor) -> torch.Tensor:
        """``[T, K]`` physical slot of each choice (``-1`` = none), as :func:`assignment_slots`:
        one gather from :func:`lookup_tables`' table where no expert is replicated (the
        replicas' round-robin needs :func:`assignment_slots`)."""
        if self.replicated:
            return assignment_slots(indices_TK, self.tables, self.rank, True)
        return self.slot_E1[indices_TK]

    def local_of(self, slot_QK: torch.Tensor) -> torch.Tensor:
        """``[Q, K]`` this rank's local slot of each physical slot in ``slot_QK`` (``-1`` for
        other ranks' slots and for ``-1``): one gather, equal to :func:`local_slots`."""
        return self.local_R1[slot_QK]

    # ----------------------------------------------------------------------------- compute
    def forward(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """x_TD ``[T, D]``, indices_TK ``[T, K]`` logical experts (``-1`` = none), weights_TK
        ``[T, K]`` -> ``[T, D]``. Collective: every rank of the group must call it (``T`` may be 0)."""
        if self.sm_carveout is None:
            return self._forward_mode(x_TD, indices_TK, weights_TK)
        check_sm_carveout(self.sm_carveout, x_TD.device)  # fewer than this device's SMs
        return carved_out(self._forward_mode, self.sm_carveout, x_TD, indices_TK, weights_TK)

    def _forward_mode(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """The forward of the configured dispatch mode."""
        if self.overlap and self.max_tokens_per_rank is not None:
            return overlapped_fixed_forward(self, x_TD, indices_TK, weights_TK)
        if self.max_tokens_per_rank is not None:
            return self._forward_fixed(x_TD, indices_TK, weights_TK)
        if self.overlap:
            return overlapped_forward(self, x_TD, indices_TK, weights_TK)
        if self.dedup:
            return self._forward_dedup(x_TD, indices_TK, weights_TK)
        order = dispatch_order(indices_TK, self.tables, self.num_ranks, self.rank, self.replicated)
        recv_counts_PS = exchange_counts(order.send_counts_PS, self.group)
        # one host sync for both split lists (dropless EP needs the sizes on the host)
        send_splits, recv_splits = torch.stack([order.send_counts_PS.sum(1), recv_counts_PS.sum(1)]).tolist()
        x_send = x_TD[order.token_ids_N[:sum(send_splits)]]
        x_recv = all_to_all(self._sendable(x_send), recv_splits, send_splits, self.group)
        slot_Q = received_slots(recv_counts_PS, sum(recv_splits))
        ones_Q1 = torch.ones(slot_Q.shape[0], 1, dtype=x_TD.dtype, device=x_TD.device)
        y_recv = self._compute_local(x_recv, slot_Q[:, None], ones_Q1, slot_Q.shape[0])
        y_back = all_to_all(y_recv, send_splits, recv_splits, self.group)
        return combine(y_back, order, weights_TK)

    def _forward_dedup(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        slots_per_rank = self.slots_per_rank
        slot_TK = self.physical_slots(indices_TK)
        disp = row_dispatch(slot_TK, self.num_ranks, slots_per_rank)
        recv_counts_P2 = exchange_counts(disp.send_counts_P2, self.group)
        # the one host sync: rows and assignments, sent and received (dropless EP needs the
        # split sizes on the host)
        send_rows, send_assign, recv_rows, recv_assign = torch.cat(
            [disp.send_counts_P2.t(), recv_counts_P2.t()]).tolist()
        num_rows, num_assign = sum(send_rows), sum(send_assign)
        # the token rows first: the GPU idles from the sync until the first big kernel
        token_ids_V = disp.token_ids_V[:num_rows]
        x_recv = all_to_all(self._sendable(spread(x_TD, token_ids_V, disp.inv_TP)), recv_rows, send_rows,
                            self.group)
        meta_A = all_to_all_plain(disp.meta_N[:num_assign], recv_assign, send_assign, self.group)
        w_send_A = weights_TK.reshape(-1).index_select(0, disp.perm_N[:num_assign])
        w_recv_A = all_to_all(self._sendable(w_send_A), recv_assign, send_assign, self.group)
        indices_UK, weights_UK = received_routing(recv_counts_P2, meta_A // slots_per_rank, meta_A % slots_per_rank,
                                                  w_recv_A, weights_TK.shape[1], sum(recv_rows))
        y_recv = self._compute_local(x_recv, indices_UK, weights_UK, sum(recv_assign))
        y_back = all_to_all(y_recv, send_rows, recv_rows, self.group)
        # partial sums of <= P ranks per token: a gather-sum, fp32 inside, activation dtype out
        return collect(y_back, token_ids_V, disp.inv_TP)

    def _forward_fixed(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """The fixed-size dispatch (``max_tokens_per_rank = C``): no host sync. Rank ``q``'s
        padded rows ``[C, D]`` go to every rank; this rank computes ``Q = P * C`` received rows
        with the choices that fall on its slots (``-1`` elsewhere) and returns each rank its
        ``[C, D]`` partial sums, which the token's rank adds up."""
        num_tokens = indices_TK.shape[0]
        cap, num_ranks = self.max_tokens_per_rank, self.num_ranks
        if num_tokens > cap:
            raise ValueError(f"x: {num_tokens} tokens on rank {self.rank}, more than max_tokens_per_rank={cap}")
        slot_TK = self.physical_slots(indices_TK)
        x_QD, slot_QK, w_QK = self.gather_fixed(True, *pad_rows(cap, x_TD, slot_TK, weights_TK))
        # entries marked -1 are skipped, their weights unused (zero gradient): no weight masking
        y_QD = self.local(x_QD, self.local_of(slot_QK), w_QK)
        # block q of what comes back: rank q's partial sums for this rank's C rows
        y_back = self.swap_fixed(True, y_QD)
        return sum_partials(y_back, num_ranks, cap, num_tokens, x_TD.dtype)

    def gather_fixed(self, include_self: bool, x_CD: torch.Tensor, slot_CK: torch.Tensor,
                     w_CK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fixed-size dispatch: this rank's ``C`` padded rows, their slots and weights to
        every other rank (and itself with ``include_self``): ``[B * C, ...]`` each, block ``j``
        from the ``j``-th rank in rank order. Differentiable in ``x`` and the weights."""
        if self.exchange is not None:
            return gather_blocks(self.exchange, include_self, self._sendable(x_CD), slot_CK, self._sendable(w_CK))
        splits = self._fixed_splits(include_self, x_CD.shape[0])
        copies = sum(1 for c in splits if c)
        # an all-gather as an all-to-all of B copies: one differentiable collective that gloo
        # and NCCL both have; its backward sums the copies' gradients (repeat's adjoint)
        return (all_to_all(self._sendable(x_CD).repeat(copies, 1), splits, splits, self.group),
                all_to_all_plain(slot_CK.repeat(copies, 1), splits, splits, self.group),
                all_to_all(self._sendable(w_CK).repeat(copies, 1), splits, splits, self.group))

    def swap_fixed(self, include_self: bool, y_BD: torch.Tensor) -> torch.Tensor:
        """The fixed-size combine: block ``j`` of ``y_BD`` (``[B * C, D]``, partial sums for the
        ``j``-th rank's rows) to that rank; returns the blocks for this rank's rows, same shape."""
        if self.exchange is not None:
            return swap_blocks(self.exchange, include_self, y_BD)[0]
        blocks = self.num_ranks if include_self else self.num_ranks - 1
        splits = self._fixed_splits(include_self, y_BD.shape[0] // blocks)
        return all_to_all(y_BD, splits, splits, self.group)

    def _fixed_splits(self, include_self: bool, cap: int) -> list[int]:
        return [cap if include_self or p != self.rank else 0 for p in range(self.num_ranks)]

    def _sendable(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank must run the all-to-alls' backwards in the same order, also a rank whose
        inputs need no gradient: give such a tensor a (discarded) gradient path."""
        if torch.is_grad_enabled() and self.local.w_in.requires_grad and not t.requires_grad:
            return t.detach().requires_grad_()
        return t

    def _compute_local(self, x_QD: torch.Tensor, slots_QK: torch.Tensor, weights_QK: torch.Tensor,
                       num_assign: int, join: WeightGradJoin | None = None) -> torch.Tensor:
        """Run the local slots on the received rows: ``[Q, D]``. ``num_assign`` (host int)
        is the number of entries ``>= 0`` in ``slots_QK``. ``join``: see :meth:`local_call`."""
        w_in, w_out = self.local.w_in, self.local.w_out
        # No rows (or no valid entry): every backend keeps its result connected to all inputs
        # (moekit.experts.reference.connect), so this rank still runs the collectives' backward.
        if slots_QK.shape[1] > 1 and self._compact_grouped(x_QD):
            return compact_grouped_experts(x_QD, slots_QK, weights_QK, w_in, w_out, num_assign,
                                           self.cfg.activation, join)
        return self.local_call(x_QD, slots_QK, weights_QK, join)

    def new_join(self) -> WeightGradJoin | None:
        """A join for the expert calls of one forward (``None``: ``join_weight_grads`` is off,
        or no gradient is being recorded)."""
        return WeightGradJoin() if self.join_weight_grads and torch.is_grad_enabled() else None

    def local_call(self, x_QD: torch.Tensor, slots_QK: torch.Tensor, weights_QK: torch.Tensor,
                   join: WeightGradJoin | None = None) -> torch.Tensor:
        """``self.local(x_QD, slots_QK, weights_QK)`` (``[Q, D]``); with a ``join`` (from
        :meth:`new_join`, shared by the calls of one forward) and the grouped-GEMM backend, the
        calls' weight gradients are joined into one (:mod:`moekit.experts.join`). Other backends
        ignore the join: autograd adds their gradients."""
        if join is None or resolve_backend(self.cfg.backend, x_QD.device) != "grouped_mm":
            return self.local(x_QD, slots_QK, weights_QK)
        w_in, w_out = self.local.w_in, self.local.w_out
        if w_in.dtype != x_QD.dtype:  # as GroupedExperts.forward: the kernels take one dtype
            w_in, w_out = w_in.to(x_QD.dtype), w_out.to(x_QD.dtype)
        return experts_grouped_mm(x_QD, slots_QK, weights_QK, w_in, w_out, self.cfg.activation, join=join)

    def _compact_grouped(self, x_QD: torch.Tensor) -> bool:
        """Whether the local slots run on the grouped-GEMM ops with only the valid rows."""
        if resolve_backend(self.cfg.backend, x_QD.device) != "grouped_mm":
            return False
        if torch.is_autocast_enabled(x_QD.device.type):
            return False  # the public backend casts under autocast: leave it to it
        return grouped_mm_supported(x_QD, self.local.w_in, self.local.w_out)

    # ----------------------------------------------------------------------------- gradients
    @torch.no_grad()
    def reduce_replica_grads(self) -> None:
        """Sum the gradients of the replicas of each replicated expert (each replica saw only
        its share of the tokens), so replicas take identical steps: replicas on this rank are
        summed locally, experts with replicas on several ranks by an in-place all-reduce of
        one slot's gradient over the EP group (:mod:`moekit.parallel.replicas`). No host
        sync, no staging copies."""
        self._replica_sync.reduce((self.local.w_in, self.local.w_out), self.group)


def _copy_engine(transport, group, max_tokens_per_rank) -> CopyEngineExchange | None:
    """The exchange object of ``transport`` (``None``: the process group's all-to-all)."""
    if transport == "all_to_all":
        return None
    if not isinstance(transport, CopyEngineExchange) and transport != "copy_engine":
        raise ValueError(f"transport: expected 'all_to_all', 'copy_engine' or a CopyEngineExchange, got {transport!r}")
    if max_tokens_per_rank is None:
        raise ValueError("transport: the copy-engine exchanges serve the fixed-size dispatch only; "
                         "set max_tokens_per_rank")
    exchange = transport if isinstance(transport, CopyEngineExchange) else CopyEngineExchange(group)
    if (exchange.rank, exchange.world) != group_rank_size(group):
        raise ValueError("transport: the CopyEngineExchange must be made over the layer's EP group")
    return exchange


def compact_grouped_experts(x_UD: torch.Tensor, slots_UK: torch.Tensor, weights_UK: torch.Tensor,
                            w_in_SHD: torch.Tensor, w_out_SDF: torch.Tensor, num_assign: int,
                            activation: str, join: WeightGradJoin | None = None) -> torch.Tensor:
    """The grouped-GEMM expert ops of :mod:`moekit.experts.grouped` on the ``num_assign``
    valid entries of a ``-1``-padded routing only: ``[U, D]``.

    The public backend gathers ``x`` for all ``U * K`` entries (the ``-1`` ones sort last and
    are never used); a deduplicated EP receiver's rows are about half empty for ``k = 8`` over
    2 ranks. The sort puts the valid entries first, so truncating the sorted order to the
    count known on the host leaves every later step (gathers, GEMMs, activation, gather-sum,
    and the backward) working on valid rows only. ``join``: see
    :meth:`ExpertParallelExperts.local_call`.
    """
    order_N, inv_UK, offs_S = route_by_expert(slots_UK, w_in_SHD.shape[0])
    return experts_grouped_sorted(x_UD.contiguous(), weights_UK.contiguous(), w_in_SHD.contiguous(),
                                  w_out_SDF.contiguous(), order_N[:num_assign], inv_UK, offs_S, activation, join)
