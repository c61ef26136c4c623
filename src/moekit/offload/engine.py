"""The offload engine: CPU-resident experts, a fixed pool of device expert slots, chunked
copies on their own stream, prefetch of the next layer's predicted experts, CPU computation of
missing experts, and the counters.

One engine serves every MoE layer of a model. For each layer call it

1. moves the layer's routing choices ``[T, k]`` as they are to the host (pinned memory, an
   event): the one host synchronisation of the layer, and the only device work before it.
   While it waits it keeps feeding prefetch chunks to the copy stream
   (:meth:`OffloadEngine.pump`). The host works out the tokens per expert and the order of
   every sum from them (:func:`~moekit.offload.routing_plan.plan_routing`);
2. looks every needed expert up in the cache (:class:`~moekit.offload.cache.ExpertCache`) and
   issues its copies at once: a miss is copied into a slot (demand copy, all its missing
   chunks at once; one copy per weight tensor when nothing is prefetched) or, when the cost
   model says it finishes sooner, computed on the CPU for the tokens that need it (list
   scheduling over the two queues). Only then the bookkeeping, and the prefetch aimed at this
   layer stops (its routing is known: unissued chunks of a wrong guess are never copied);
3. with ``prefetch="next_layer"``, predicts the *next* layer's experts by running the next
   layer's router on this layer's input, ranks them (predicted top-k first, then by predicted
   probability mass) and queues them for prefetch; with ``prefetch="layer_output"`` the
   prediction is made when the decoder layer ends (:meth:`OffloadEngine.predict_from_output`,
   called by a hook) from the residual stream the next layer starts from: later, but more
   often right. Its result is not waited for there (that would be a second host
   synchronisation per layer, leaving the device idle while the host launches the next
   attention): it is copied to the host asynchronously and read, and its prefetch issued,
   at the first :meth:`OffloadEngine.poll` after it has arrived (pre-hooks on every module of
   the decoder layers call it between the host's launches; it also keeps prefetch chunks
   queued there) or while the host waits for the next layer's counts (step 1);
   ``prefetch="next_layer+layer_output"`` queues the first and replaces it by the second;
4. computes each needed expert once for all the tokens of the batch routed to it: the rows of
   the layer gathered once in expert order, the resident experts first (the device works while
   the copies run, and their slots are free early for streamed misses), then the copied ones,
   the compute stream waiting on a slot's copy only when it reaches that expert; the sums are
   then made in the order of ``transformers``' eager expert loop, so results are the plain
   model's bit for bit (:mod:`moekit.offload.routing_plan`: ``2 + 2k`` device operations per
   layer call and five per expert).
   Misses sent to the CPU go to a worker thread before the device work is queued
   (:mod:`moekit.offload.cpu_experts`), so the copy engine, the device, the CPU and the
   launching thread work at once; the host waits for their rows after queueing the rest.
   Their sums follow in the same ascending order, and their measured times refine the cost
   model (:meth:`~moekit.offload.costs.TransferCosts.observe_cpu`).

With ``staging_slots > 0`` a guess is copied into a staging slot outside the cache instead
(:mod:`moekit.offload.staging`) and joins the cache only when a layer needs it (step 2), evicting
then the expert its demand copy would have evicted: while no layer call needs more experts than
its quota of cache slots, the cache's contents are those of the same cache without prefetch, and
a wrong guess costs only its own copy. ``prefetch="layer_output2"``
predicts the next two layers from a decoder layer's output (the nearer layer's guesses queued
first).

Prefetch copies never take a slot holding an expert the current layer needs or one ranked
above them, and are issued only while the copy stream has fewer than ``lead_chunks`` chunks
queued, so demand copies wait behind at most that many chunks (:mod:`moekit.offload.copies`).
On a CPU "device" (tests) copies are synchronous and their time counts as stall; each pump
then issues ``lead_chunks`` chunks, so partial prefetches happen there too.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from moekit.offload.cache import ExpertCache
from moekit.offload.copies import ChunkedCopier
from moekit.offload.costs import TransferCosts
from moekit.offload.counters import OffloadCounters
from moekit.offload.cpu_experts import CpuExperts
from moekit.offload.prediction import PredictionMixin, Predictor, rank_predictions
from moekit.offload.routing_plan import (
    combine_in_expert_order,
    plan_routing,
    write_expert_rows,
)
from moekit.offload.staging import StagingArea

__all__ = ["OffloadCounters", "OffloadEngine", "rank_predictions"]


class OffloadEngine(PredictionMixin):
    """Expert weights of ``L`` MoE layers on the host, ``num_slots`` slots on ``device``.

    host_w_in: per layer ``[E, 2F, D]`` (pinned when ``device`` is CUDA). host_w_out: per layer
    ``[E, D, F]``. act_fn: the experts' activation (SwiGLU gate). costs: measured
    :class:`TransferCosts`; cpu_compute: let the cost model compute misses on the CPU.
    predictors: per layer, the function predicting the next layer's experts from this layer's
    input (``prefetch="next_layer"``); out_predictors: from the decoder layer's output
    (``prefetch="layer_output"``); None: no prefetch. chunk_bytes: copy chunk size;
    lead_chunks: prefetch chunks kept queued; prefetch_extra: experts prefetched beyond the
    predicted top-k set, by predicted probability mass. staging_slots: device slots beyond the
    ``num_slots`` cache slots that hold prefetched guesses until their layer needs them
    (:mod:`moekit.offload.staging`; 0: guesses take cache slots at once). An out-predictor entry
    may be a tuple of predictors, of layers ``i + 1, i + 2, ...`` (prefetch several layers
    ahead). copy_landed: ``slot -> bool``, whether
    the copies issued into a slot have finished, asked when a layer looks its experts up
    (default :meth:`ChunkedCopier.landed`, a non-blocking event query; tests inject a fake to
    make copies look late on a CPU device, where they are synchronous).
    """

    def __init__(self, host_w_in: list[torch.Tensor], host_w_out: list[torch.Tensor], num_slots: int,
                 policy: str, device: torch.device, act_fn: Callable, costs: TransferCosts,
                 cpu_compute: bool = False, predictors: list[Predictor | None] | None = None,
                 out_predictors: list[Predictor | None] | None = None, chunk_bytes: int = 32 * 2**20,
                 lead_chunks: int = 2, prefetch_extra: int = 0, copy_landed: Callable[[int], bool] | None = None,
                 staging_slots: int = 0):
        self.host_w_in, self.host_w_out = host_w_in, host_w_out
        self.device = torch.device(device)
        self.num_experts = int(host_w_in[0].shape[0])
        w_in, w_out = host_w_in[0], host_w_out[0]
        self.expert_bytes = w_in[0].numel() * w_in.element_size() + w_out[0].numel() * w_out.element_size()
        self.cache = ExpertCache(num_slots, policy, num_layers=len(host_w_in))
        self.staging_slots = int(staging_slots)
        # cache slots first, then the staging slots; which index is which changes with promotions
        self.staging = (StagingArea(list(range(num_slots, num_slots + self.staging_slots)))
                        if self.staging_slots > 0 else None)
        total = num_slots + self.staging_slots
        self.slot_in = torch.empty((total, *w_in.shape[1:]), dtype=w_in.dtype, device=self.device)
        self.slot_out = torch.empty((total, *w_out.shape[1:]), dtype=w_out.dtype, device=self.device)
        self.copier = ChunkedCopier(host_w_in, host_w_out, self.slot_in, self.slot_out, self.device, chunk_bytes)
        self.copy_landed = copy_landed or self.copier.landed
        self.act_fn = act_fn
        self.costs = costs
        self.cpu_compute = cpu_compute
        self.predictors = predictors or [None] * len(host_w_in)
        self.out_predictors = [p if p is None or isinstance(p, (tuple, list)) else (p,)
                               for p in (out_predictors or [None] * len(host_w_in))]
        self.lead_chunks = max(1, int(lead_chunks))
        self.prefetch_extra = int(prefetch_extra)
        self.cuda = self.device.type == "cuda"
        self._prefetched: set[tuple[int, int]] = set()  # started by prefetch, not used yet
        self._predicted: dict[int, set[int]] = {}  # layer -> predicted top-k set of its next call
        self._queued_at: dict[int, float] = {}  # layer -> host time its prefetch was queued
        self._queue: list[tuple[int, int]] = []  # prefetch keys still to issue, best first
        self._guard: set[tuple[int, int]] = set()  # keys a prefetch must not evict
        self._host_bufs: dict[torch.dtype, torch.Tensor] = {}  # pinned, for the per-layer routing
        self._index_buf: torch.Tensor | None = None  # pinned, for the per-layer index arrays
        # whether any predictor is set; without one nothing needs a demand copy in chunks (chunks
        # bound how long a demand copy waits behind prefetch chunks): one copy per weight tensor
        self.prefetching = any(p is not None for p in self.predictors + self.out_predictors)
        self._pred_buf: torch.Tensor | None = None  # pinned, for a layer_output prediction
        # (target layer, host values, arrival event or None) of a layer_output prediction not read yet
        self._pending: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None
        self.counters = OffloadCounters()
        # computes the misses sent to the CPU on a worker thread (cpu_experts)
        self.cpu = CpuExperts(host_w_in, host_w_out, act_fn, self.device, self._cpu_done) if cpu_compute else None

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    # ------------------------------------------------------------------ copies
    def _demand(self, key: tuple[int, int], slot: int) -> None:
        """Copy every missing chunk of ``key`` into ``slot`` now (a demand copy)."""
        nbytes = self.copier.issue(key, slot, merged=not self.prefetching)
        self.counters.h2d_bytes += nbytes
        self.counters.demand_copies += 1

    def pump(self) -> None:
        """Issue queued prefetch chunks while the copy stream has fewer than ``lead_chunks``
        chunks in flight (on a CPU device: ``lead_chunks`` chunks per call)."""
        room = self.lead_chunks - self.copier.queued()
        while room > 0 and self._queue:
            key = self._queue[0]
            slot = self._resident(key)
            if slot is None:
                if self.staging is not None:  # a guess takes a staging slot, never a cache slot
                    placed = self.staging.take(key, self._guard)
                else:
                    placed = self.cache.insert(key, self._guard, recent=False)
                if placed is None:  # every slot it may take is guarded: nothing more to prefetch
                    self._queue.clear()
                    return
                if self.staging is not None and placed[1] in self._prefetched:
                    self.counters.staged_dropped += 1  # a guess no layer used
                slot = self._occupy(placed)
                self._prefetched.add(key)
                self.counters.prefetch_copies += 1
            before = self.copier.chunks_issued
            nbytes = self.copier.issue(key, slot, room)
            room -= self.copier.chunks_issued - before
            self.counters.h2d_bytes += nbytes
            self.counters.prefetch_bytes += nbytes
            if self.copier.complete(slot):
                self._queue.pop(0)

    def poll(self) -> None:
        """Called between the host's launches (pre-hooks on the modules of every decoder layer,
        :func:`moekit.offload.offload`): start the prefetch of a ``layer_output`` prediction as
        soon as it has arrived, and keep ``lead_chunks`` prefetch chunks queued. Without it both
        happened only while the host waited for a layer's counts, i.e. when the routing they
        guess was about to be known: where the host, not the copy engine, sets the pace (a layer
        whose experts are all resident) a prediction sat unread and the copy stream ran dry
        while the host launched the next attention."""
        pending = self._pending
        if pending is not None and (pending[2] is None or pending[2].query()):
            self._pending = None
            self._set_prefetch(self._read_prediction(pending), set())
        if self._queue:
            self.pump()

    def _to_host(self, t: torch.Tensor) -> list:
        """``t.tolist()`` for a 1-D ``t`` (int64 routing, or float32 routing and prediction),
        feeding prefetch chunks to the copy stream while the device catches up, and starting the prefetch of a pending ``layer_output``
        prediction as soon as it arrives. Spins instead of sleeping (a sleep can overshoot by
        milliseconds on a virtual machine's timer) and blocks when there is nothing to feed or
        wait for; the pinned buffer is reused (its last copy was read before this one is
        issued). On a CPU device a pending prediction is read first (it was computed first)."""
        t0 = time.perf_counter()
        if self.cuda:
            n = t.numel()
            buf = self._host_bufs.get(t.dtype)
            if buf is None or buf.numel() < n:
                buf = torch.empty(max(n, 4 * self.num_experts), dtype=t.dtype, pin_memory=True)
                self._host_bufs[t.dtype] = buf
            host = buf[:n]
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            while not done.query():
                if self._pending is None and not self._queue:  # nothing to feed or wait for
                    done.synchronize()
                    break
                self.poll()
            t = host
        elif self._pending is not None:
            pending, self._pending = self._pending, None
            self._set_prefetch(self._read_prediction(pending), set())
        values = t.tolist()
        self.counters.host_wait_s += time.perf_counter() - t0
        return values

    def _wait_ready(self, slot: int) -> None:
        ready = self.copier.take_ready(slot)
        if ready is None:
            return
        stream = torch.cuda.current_stream(self.device)
        marker = torch.cuda.Event(enable_timing=True)
        marker.record(stream)
        stream.wait_event(ready)
        self.counters.pending_waits.append((marker, ready))
        if len(self.counters.pending_waits) > 4096:
            self.resolve_stalls()

    def resolve_stalls(self) -> None:
        """Turn the recorded (compute reached the wait, copy finished) event pairs into stall
        seconds, and the copy events into copy-engine busy seconds; waits for the CPU worker and
        synchronises the device."""
        if self.cpu is not None:
            self.cpu.drain()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.copier.resolve()
        c = self.counters
        for marker, ready in c.pending_waits:
            c.stall_s += max(marker.elapsed_time(ready), 0.0) / 1e3
        c.pending_waits.clear()

    def _cpu_done(self, seconds: float, num_tokens: int) -> None:
        """One CPU expert finished (called on the worker thread): the cost model and the counter."""
        self.costs.observe_cpu(seconds, num_tokens)
        self.counters.cpu_busy_s += seconds

    def close(self) -> None:
        """Finish the CPU worker's last job and stop its thread (the engine is not used again)."""
        if self.cpu is not None:
            self.cpu.close()

    # ------------------------------------------------------------------ one layer
    def forward(self, layer: int, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """The routed-experts output ``[T, D]`` of MoE layer ``layer`` for ``x_TD [T, D]`` routed
        by ``indices_TK [T, k]`` with combine weights ``weights_TK [T, k]``."""
        num_experts = self.num_experts
        num_tokens, top_k = indices_TK.shape
        flat = indices_TK.reshape(-1)
        predictor = self.predictors[layer]
        if predictor is None:  # the routing itself is all the host needs: counted there
            host = self._to_host(flat)  # the one host synchronisation of the layer
        else:
            host = self._to_host(torch.cat([flat.to(torch.float32), self._prediction_tensor(predictor, x_TD)]))
        plan = plan_routing(host[:num_tokens * top_k], top_k, num_experts)
        queued_at = self._queued_at.pop(layer, None)  # its routing is known: the guesses' lead ends
        if queued_at is not None:
            self.counters.prefetch_lead_s += time.perf_counter() - queued_at
            self.counters.prefetch_leads += 1
        # a layer_output prediction that arrived with the counts: too late for this layer (only
        # scored); its guesses for later layers are queued after this layer's demand copies
        late = self._read_prediction(self._pending, known=layer) if self._pending is not None else []
        self._pending = None
        counts_E = plan.counts_E
        needed = plan.needed()
        c = self.counters

        # plan: hits, CPU-computed misses, demand copies (deferred when no slot is free); the
        # copies are issued here, before any other bookkeeping of the layer
        protected = {(layer, e) for e in needed}
        slot_of: dict[int, int] = {}
        landed: set[int] = set()  # hits: nothing to wait for, computed first
        on_cpu: list[int] = []
        copy_s = cpu_s = 0.0  # work queued on the copy engine / the CPU by this plan
        for e in needed:
            key = (layer, e)
            self.cache.use(key)
            c.activations += 1
            slot = self.cache.lookup(key)
            staged = slot is None and self.staging is not None and key in self.staging
            if staged:
                slot = self.staging.lookup(key)
            if slot is not None and self.copier.complete(slot):
                # every chunk issued: a hit if the copies have landed, else a late prefetch
                # (asked without waiting, now, when the layer needs the expert)
                if self.copy_landed(slot):
                    c.hits += 1
                    c.prefetch_useful += key in self._prefetched
                    c.staged_hits += staged
                    c.victim_hits += staged and key not in self._prefetched
                    landed.add(e)
                else:
                    c.inflight_hits += 1
                    c.staged_inflight_hits += staged
                self._prefetched.discard(key)
                slot_of[e] = slot
                if staged:
                    self._promote(key, slot, protected)
                continue
            self._prefetched.discard(key)
            if slot is not None:  # part of it was prefetched: copy the rest
                copy_s += self.copier.missing_bytes(slot) / self.costs.h2d_bytes_per_s
                slot_of[e] = slot
                self._demand(key, slot)
                if staged:
                    c.staged_misses += 1
                    self._promote(key, slot, protected)
            elif self.cpu_compute and self.costs.prefer_cpu(counts_E[e], copy_s, cpu_s):
                on_cpu.append(e)  # list scheduling: the expert goes where it finishes first
                cpu_s += self.costs.cpu_s(counts_E[e])
            else:
                # copied now or, when every slot holds an expert this layer still needs, streamed
                # through a slot later: either way it is copy work the CPU can take over
                copy_s += self.costs.copy_s()
                placed = self.cache.insert(key, protected)
                if placed is None:
                    continue
                slot_of[e] = self._occupy(placed)
                self._demand(key, slot_of[e])
        c.layer_calls += 1
        if layer == 0:
            c.tokens += num_tokens
        self._score_prediction(layer, needed)
        self._queue = [k for k in self._queue if k[0] != layer]  # its routing is known: stop guessing
        c.cpu_computed += len(on_cpu)
        if predictor is not None:
            e = num_experts
            self._set_prefetch([(layer + 1, host[num_tokens * top_k:][:e], host[num_tokens * top_k + e:])], protected)
        if late:
            self._set_prefetch(late, protected)

        # the rows of every assignment, sorted by expert, gathered once (routing_plan)
        n = plan.num_assignments
        idx = self._index_to_device(plan.index)
        tok_N, comb_KT = idx[:n], idx[2 * n:].view(top_k, num_tokens)
        x_ND = x_TD.index_select(0, tok_N)
        w_N1 = weights_TK.reshape(-1).index_select(0, idx[n:2 * n]).unsqueeze(1)
        y_ND1 = torch.empty((n + 1, x_TD.shape[1]), dtype=x_TD.dtype, device=x_TD.device)
        if plan.needs_zero_row:
            y_ND1[n].zero_()
        starts = plan.starts_E1
        if on_cpu:  # their rows go to the host (the compute stream holds no wait on a copy yet) and the
            # worker starts on them now, while this thread queues the device's work
            self.cpu.submit(layer, on_cpu, starts, plan.tok_N, x_TD.to("cpu"))

        # queue every copy and GPU expert: the hits first (nothing to wait for: the device works
        # while the copies run, and their slots are free early for streamed misses), then the
        # others in ascending order; the sums come after, in the plain model's order
        cpu_set = set(on_cpu)
        order = [e for e in needed if e in landed] + [e for e in needed if e not in landed and e not in cpu_set]
        for e in order:
            if e not in slot_of:  # more experts than free slots: stream through the slots
                # a slot of an expert this layer has computed already, else one borrowed from
                # another layer over the quota, else (fewer slots than experts still to come)
                # one of this layer's later experts, which is then fetched again
                key = (layer, e)
                placed = (self.cache.insert(key, protected) or self.cache.insert(key, protected, borrow=True)
                          or self.cache.insert(key))
                evicted = placed[1]
                if evicted is not None and evicted[0] == layer:
                    slot_of.pop(evicted[1], None)
                slot_of[e] = self._occupy(placed)
                self._demand(key, slot_of[e])
            slot = slot_of[e]
            if self.cuda:
                self._wait_ready(slot)
            s, t = starts[e], starts[e + 1]
            write_expert_rows(y_ND1[s:t], x_ND[s:t], w_N1[s:t], self.slot_in[slot], self.slot_out[slot], self.act_fn)
            self.copier.mark_read(slot)
            protected.discard((layer, e))

        if on_cpu:  # their rows, once the worker has them
            self.cpu.receive(on_cpu, starts, y_ND1, w_N1)
        out_TD = combine_in_expert_order(y_ND1, comb_KT, num_tokens)
        self.pump()
        return out_TD

    def _index_to_device(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` (a CPU int64 tensor) on the device. On CUDA through a pinned buffer, asynchronously on
        the compute stream: the buffer is written again only after the next layer's routing has
        been read, which the device produces after this copy, so no copy is overwritten early."""
        if not self.cuda:
            return host
        if self._index_buf is None or self._index_buf.numel() < host.numel():
            self._index_buf = torch.empty(max(host.numel(), 1024), dtype=torch.int64, pin_memory=True)
        buf = self._index_buf[:host.numel()]
        buf.copy_(host)
        return buf.to(self.device, non_blocking=True)

    def _resident(self, key: tuple[int, int]) -> int | None:
        """The slot holding (some chunks of) ``key``: a cache slot, else a staging slot, else None."""
        slot = self.cache.lookup(key)
        if slot is None and self.staging is not None:
            slot = self.staging.lookup(key)
        return slot

    def _promote(self, key: tuple[int, int], slot: int, protected: set[tuple[int, int]]) -> None:
        """The staged ``key`` (in ``slot``) is needed: its slot joins the cache, and the expert
        the cache evicts for it (the one its demand copy would have evicted) leaves with its
        slot for the staging area, where its weights stay usable until a guess overwrites them.
        When the cache may not evict anything now (every candidate protected), ``key`` stays
        staged and this layer call reads it there."""
        placed = self.cache.exchange(key, slot, protected)
        if placed is None:
            return
        self.staging.remove(key)
        left, evicted = placed
        if evicted is not None:
            self._prefetched.discard(evicted)
            if evicted in self._queue:
                self._queue.remove(evicted)
        self.staging.add(left, evicted)

    def _occupy(self, placed: tuple[int, tuple[int, int] | None]) -> int:
        """Take the slot the cache just gave (``placed = (slot, evicted key or None)``): the
        evicted expert's prefetch bookkeeping goes, the slot's copy state starts afresh.
        Returns the slot."""
        slot, evicted = placed
        self._forget(evicted)
        self.copier.assign(slot)
        return slot

    def _forget(self, evicted: tuple[int, int] | None) -> None:
        if evicted is not None:
            if evicted in self._prefetched and evicted[0] in self._queued_at:
                self.counters.prefetch_evicted_early += 1  # a guess gone before its layer ran
            self._prefetched.discard(evicted)
            if evicted in self._queue:
                self._queue.remove(evicted)
