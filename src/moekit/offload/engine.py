"""The offload engine: CPU-resident experts, a fixed pool of device expert slots, copies on
their own stream, next-layer prefetch, CPU computation of missing experts, and the counters.

One engine serves every MoE layer of a model. For each layer call it

1. counts the tokens per expert of the layer (and, with prefetch, of the *next* layer as
   predicted by running the next layer's router on this layer's input) and moves both count
   vectors to the host in one transfer: the only host synchronisation of the layer;
2. looks every needed expert up in the cache (:class:`~moekit.offload.cache.ExpertCache`);
   a miss is either copied into a slot (demand copy, on the copy stream) or, when the cost
   model says it is faster, computed on the CPU for the tokens that need it;
3. queues copies of the predicted experts of the next layer behind the demand copies, so they
   overlap this layer's expert compute and the next layer's attention;
4. computes each needed expert once for all the tokens of the batch routed to it, in
   ascending expert order, exactly like ``transformers``' eager expert loop (so results are
   the plain model's), the compute stream waiting on each slot's copy event only when it
   reaches that expert.

Slot reuse is safe across streams: a copy into a slot waits for the event recorded after the
last computation that read it. On a CPU "device" (tests) copies are synchronous and their time
counts as stall.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from moekit.offload.cache import ExpertCache
from moekit.offload.costs import TransferCosts

__all__ = ["OffloadCounters", "OffloadEngine"]

Predictor = Callable[[torch.Tensor], torch.Tensor]  # x_TD -> predicted indices [T, k] of the next layer


@dataclass
class OffloadCounters:
    """Raw counts behind ``handle.stats()`` (see :mod:`moekit.offload.api` for the figures).

    activations: (layer call, expert) pairs needed by at least one token. hits: those whose
    weights were in a slot (copied or with the copy already queued) when the layer needed them.
    cpu_computed: misses computed on the CPU. demand_copies / prefetch_copies: expert copies
    issued. prefetch_useful: prefetched experts used by the layer they were fetched for.
    predicted / predicted_used: |P| and |P & A| summed over layer calls (P predicted set, A
    needed set); needed_after_prediction: |A| over the same layer calls. h2d_bytes: bytes
    copied to the device. stall_s: time the computation waited for copies. tokens: tokens
    through the first MoE layer. wall_s: wall time of the model's forward passes.
    """

    activations: int = 0
    hits: int = 0
    cpu_computed: int = 0
    demand_copies: int = 0
    prefetch_copies: int = 0
    prefetch_useful: int = 0
    predicted: int = 0
    predicted_used: int = 0
    needed_after_prediction: int = 0
    h2d_bytes: int = 0
    stall_s: float = 0.0
    tokens: int = 0
    wall_s: float = 0.0
    layer_calls: int = 0
    pending_waits: list = field(default_factory=list)  # CUDA (marker, ready) event pairs


class OffloadEngine:
    """Expert weights of ``L`` MoE layers on the host, ``num_slots`` slots on ``device``.

    host_w_in: per layer ``[E, 2F, D]`` (pinned when ``device`` is CUDA). host_w_out: per layer
    ``[E, D, F]``. act_fn: the experts' activation (SwiGLU gate). costs: measured
    :class:`TransferCosts`; cpu_compute: let the cost model compute misses on the CPU.
    predictors: per layer, the function predicting the next layer's experts (None: no prefetch).
    """

    def __init__(self, host_w_in: list[torch.Tensor], host_w_out: list[torch.Tensor], num_slots: int,
                 policy: str, device: torch.device, act_fn: Callable, costs: TransferCosts,
                 cpu_compute: bool = False, predictors: list[Predictor | None] | None = None):
        self.host_w_in, self.host_w_out = host_w_in, host_w_out
        self.device = torch.device(device)
        self.num_experts = int(host_w_in[0].shape[0])
        w_in, w_out = host_w_in[0], host_w_out[0]
        self.expert_bytes = w_in[0].numel() * w_in.element_size() + w_out[0].numel() * w_out.element_size()
        self.cache = ExpertCache(num_slots, policy, num_layers=len(host_w_in))
        self.slot_in = torch.empty((num_slots, *w_in.shape[1:]), dtype=w_in.dtype, device=self.device)
        self.slot_out = torch.empty((num_slots, *w_out.shape[1:]), dtype=w_out.dtype, device=self.device)
        self.act_fn = act_fn
        self.costs = costs
        self.cpu_compute = cpu_compute
        self.predictors = predictors or [None] * len(host_w_in)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ready: dict[int, torch.cuda.Event] = {}  # slot -> copy finished
        self._free: dict[int, torch.cuda.Event] = {}  # slot -> last read finished
        self._prefetched: set[tuple[int, int]] = set()  # fetched by prefetch, not used yet
        self._predicted: dict[int, set[int]] = {}  # layer -> predicted experts of its next call
        self.counters = OffloadCounters()

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    # ------------------------------------------------------------------ copies
    def _copy(self, key: tuple[int, int], slot: int) -> None:
        layer, expert = key
        src_in, src_out = self.host_w_in[layer][expert], self.host_w_out[layer][expert]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if slot in self._free:  # do not overwrite weights a queued computation still reads
                    self.copy_stream.wait_event(self._free.pop(slot))
                self.slot_in[slot].copy_(src_in, non_blocking=True)
                self.slot_out[slot].copy_(src_out, non_blocking=True)
                ready = torch.cuda.Event(enable_timing=True)
                ready.record(self.copy_stream)
            self._ready[slot] = ready
        else:
            t0 = time.perf_counter()
            self.slot_in[slot].copy_(src_in)
            self.slot_out[slot].copy_(src_out)
            self.counters.stall_s += time.perf_counter() - t0  # a synchronous copy stalls compute
        self.counters.h2d_bytes += self.expert_bytes

    def _wait_ready(self, slot: int) -> None:
        ready = self._ready.pop(slot, None)
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
        seconds; synchronises the device."""
        if not self.counters.pending_waits:
            return
        torch.cuda.synchronize(self.device)
        for marker, ready in self.counters.pending_waits:
            self.counters.stall_s += max(marker.elapsed_time(ready), 0.0) / 1e3
        self.counters.pending_waits.clear()

    def _mark_read(self, slot: int) -> None:
        if self.cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._free[slot] = done

    # ------------------------------------------------------------------ one layer
    def forward(self, layer: int, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """The routed-experts output ``[T, D]`` of MoE layer ``layer`` for ``x_TD [T, D]`` routed
        by ``indices_TK [T, k]`` with combine weights ``weights_TK [T, k]``."""
        num_experts = self.num_experts
        flat = indices_TK.reshape(-1)
        valid = (flat >= 0) & (flat < num_experts)
        flat = torch.where(valid, flat, num_experts)  # padding slots counted in a dropped bin
        counts = [torch.bincount(flat, minlength=num_experts + 1)[:num_experts]]
        predictor = self.predictors[layer]
        if predictor is not None:
            pred = predictor(x_TD).reshape(-1)
            counts.append(torch.bincount(pred, minlength=num_experts)[:num_experts])
        host = torch.cat(counts).tolist()  # the one host synchronisation of the layer
        counts_E, pred_E = host[:num_experts], host[num_experts:]
        needed = [e for e in range(num_experts) if counts_E[e] > 0]
        c = self.counters
        c.layer_calls += 1
        if layer == 0:
            c.tokens += int(x_TD.shape[0])
        self._score_prediction(layer, needed)

        # plan: hits, CPU-computed misses, demand copies (deferred when no slot is free)
        protected = {(layer, e) for e in needed}
        slot_of: dict[int, int] = {}
        on_cpu: list[int] = []
        backlog_s = 0.0
        for e in needed:
            key = (layer, e)
            self.cache.use(key)
            c.activations += 1
            slot = self.cache.lookup(key)
            if slot is not None:
                c.hits += 1
                if key in self._prefetched:
                    c.prefetch_useful += 1
                    self._prefetched.discard(key)
                slot_of[e] = slot
            elif self.cpu_compute and self.costs.prefer_cpu(counts_E[e], backlog_s):
                on_cpu.append(e)
            else:
                placed = self.cache.insert(key, protected)
                if placed is None:  # every slot holds an expert this layer still needs
                    continue
                self._forget(placed[1])
                slot_of[e] = placed[0]
                self._copy(key, placed[0])
                c.demand_copies += 1
                backlog_s += self.costs.copy_s()
        c.cpu_computed += len(on_cpu)
        if predictor is not None:
            self._prefetch(layer + 1, pred_E, protected)

        order = torch.argsort(flat, stable=True)
        starts = [0] * (num_experts + 1)
        for e in range(num_experts):
            starts[e + 1] = starts[e] + counts_E[e]
        k = indices_TK.shape[1]

        def rows_of(e: int) -> tuple[torch.Tensor, torch.Tensor]:
            rows = order[starts[e]:starts[e + 1]]
            return rows // k, rows % k  # token and top-k position of each assignment to e

        # CPU experts now, while the copy engine works: the compute stream holds nothing yet
        # that waits on a copy, so moving their rows to the host does not wait for the copies
        from_cpu = {}
        for e in on_cpu:
            tok, _ = rows_of(e)
            from_cpu[e] = self._expert(x_TD[tok].to("cpu"), self.host_w_in[layer][e],
                                       self.host_w_out[layer][e]).to(self.device, non_blocking=True)

        # compute, ascending expert order (transformers' eager loop order)
        out_TD = torch.zeros_like(x_TD)
        for e in needed:
            if e in from_cpu:
                tok, pos = rows_of(e)
                out_TD[tok] += (from_cpu[e] * weights_TK[tok, pos, None]).to(out_TD.dtype)
                continue
            if e not in slot_of:  # more experts than free slots: stream through the slots
                # a slot of an expert this layer has computed already, else one borrowed from
                # another layer over the quota, else (fewer slots than experts still to come)
                # one of this layer's later experts, which is then fetched again
                key = (layer, e)
                placed = (self.cache.insert(key, protected) or self.cache.insert(key, protected, borrow=True)
                          or self.cache.insert(key))
                evicted = placed[1]
                self._forget(evicted)
                if evicted is not None and evicted[0] == layer:
                    slot_of.pop(evicted[1], None)
                slot_of[e] = placed[0]
                self._copy((layer, e), placed[0])
                c.demand_copies += 1
            slot = slot_of[e]
            if self.cuda:
                self._wait_ready(slot)
            tok, pos = rows_of(e)
            y = self._expert(x_TD[tok], self.slot_in[slot], self.slot_out[slot]) * weights_TK[tok, pos, None]
            out_TD[tok] += y.to(out_TD.dtype)  # rows are distinct: same sums as index_add_, far cheaper on CPU
            self._mark_read(slot)
            protected.discard((layer, e))
        return out_TD

    def _expert(self, x_ND: torch.Tensor, w_in_HD: torch.Tensor, w_out_DF: torch.Tensor) -> torch.Tensor:
        gate_NF, up_NF = F.linear(x_ND, w_in_HD).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate_NF) * up_NF, w_out_DF)

    def _forget(self, evicted: tuple[int, int] | None) -> None:
        if evicted is not None:
            self._prefetched.discard(evicted)

    def _prefetch(self, layer: int, pred_E: list[int], protected: set[tuple[int, int]]) -> None:
        """Queue copies of the experts predicted for ``layer`` (most tokens first) into slots
        not needed now."""
        if layer >= len(self.host_w_in):
            return
        predicted = [e for e in sorted(range(self.num_experts), key=lambda e: -pred_E[e]) if pred_E[e] > 0]
        self._predicted[layer] = set(predicted)
        # the target layer's other experts are fair game (its quota bounds what it may take)
        guard = set(protected) | {(layer, e) for e in predicted}
        for e in predicted:
            key = (layer, e)
            if key in self.cache:
                continue
            placed = self.cache.insert(key, guard)
            if placed is None:
                break
            self._forget(placed[1])
            self._copy(key, placed[0])
            self._prefetched.add(key)
            self.counters.prefetch_copies += 1

    def _score_prediction(self, layer: int, needed: list[int]) -> None:
        predicted = self._predicted.pop(layer, None)
        if predicted is None:
            return
        c = self.counters
        c.predicted += len(predicted)
        c.predicted_used += len(predicted.intersection(needed))
        c.needed_after_prediction += len(needed)
