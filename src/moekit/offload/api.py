"""``moekit.offload.offload(model, ...)``: run a ``transformers`` MoE model larger than the GPU.

Dense weights (attention, norms, embeddings, routers, shared experts) go to the GPU; the routed
experts' weights move to pinned CPU memory and are served through a fixed pool of GPU slots by
an :class:`~moekit.offload.engine.OffloadEngine`. Each block's ``experts`` module is replaced
by an :class:`OffloadedExperts` with the same call signature, so the block's own router and
shared experts run unchanged and ``model.generate`` works as before.

``handle.stats()`` returns (DESIGN.md, "Offload figures"):

- ``hit_rate``: hits / activations, an activation being one (layer call, expert) needed by at
  least one token of the batch (one fetch serves all of them); a hit is an expert whose weights
  were already on the device when its layer needed them: in a slot, every copy into it
  finished (asked without waiting at the moment the layer looks its experts up);
- ``inflight_hit_rate``: inflight_hits / activations, an in-flight hit (late prefetch) being an
  expert whose copy was fully issued (by a prefetch) but not finished at that moment: not a
  hit, and not a miss copied from scratch (the computation waits for the rest of the copy).
  ``1 - hit_rate - inflight_hit_rate`` is the miss rate;
- ``prefetch_precision`` = |P & A| / |P| and ``prefetch_recall`` = |P & A| / |A|, summed over
  the layer calls that had a prediction P (P: the experts in the predicted top-k of at least
  one token; A: the experts the layer then needed);
- ``prefetch_lead_s``: mean host seconds from a layer's prefetch being queued to its routing
  being known (a prefetched expert can land as a hit only if its copy fits in that time);
- ``copy_busy_fraction``: seconds the copy stream spent copying / forward wall time, and
  ``copy_bandwidth_bytes_per_s``: bytes copied / those seconds (the copy engine alone);
- ``h2d_bytes_per_token``: bytes copied to the device per token through the model;
- ``stall_s``: time the computation waited for expert copies;
- ``pcie_utilization``: bytes copied per second of forward wall time / the pinned host-to-device
  bandwidth measured on this machine when ``offload`` was called;
- ``tokens_per_s``: tokens through the model per second of forward wall time.

Prefetch modes: ``"next_layer"`` runs the next MoE layer's router on this layer's input
(known when this layer's routing is, i.e. early); ``"layer_output"`` runs the next layer's
post-attention norm and router on the output of the decoder layer holding this MoE layer
(the residual stream the next layer starts from: later, but only the next attention is
missing from it, so it is right more often); ``"next_layer+layer_output"`` starts with the
former and replaces its guesses by the latter's when they arrive (a guess the second prediction
drops stops being copied and is the first expert a later prefetch evicts); ``"layer_output2"``
predicts the next *two* MoE layers from the same output (each through its own post-attention
norm and router), queueing the nearer layer's guesses first: the farther layer's copies get a
whole decoder layer more time to land, from a weaker guess (two attentions and one MoE update
are missing from it).

Staging (``staging_slots > 0``, :mod:`moekit.offload.staging`): guesses are copied into device
slots beyond the cache and take a cache slot only when their layer needs them, evicting then
exactly the expert a demand copy would have; a wrong guess evicts nothing from the cache.
``stats()`` then also reports ``staged_hits``, ``staged_inflight_hits``, ``staged_misses``
(needed while only partly copied), ``victim_hits`` (staged hits on experts a promotion had
evicted and the staging area kept) and ``staged_dropped`` (guesses overwritten unused).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
from torch import nn

from moekit.hf.families import find_moe_blocks, predict_block
from moekit.offload.cache import POLICIES
from moekit.offload.costs import (
    TransferCosts,
    measure_cpu_expert,
    measure_h2d_bandwidth,
    parse_bytes,
)
from moekit.offload.engine import OffloadEngine

__all__ = ["OffloadedExperts", "OffloadHandle", "ForwardRecord", "offload", "PREFETCH"]

PREFETCH = ("none", "next_layer", "layer_output", "next_layer+layer_output", "layer_output2")
CPU_ADAPT = 0.25  # weight of each observed CPU expert time in the cost model (TransferCosts.observe_cpu)


class OffloadedExperts(nn.Module):
    """Stands in for a block's ``experts``: ``forward(x_TD [T, D], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, D]`` served by the shared engine for MoE layer ``layer``.
    Holds no parameters (the weights live in the engine's host tensors and slots)."""

    def __init__(self, engine: OffloadEngine, layer: int):
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "engine", engine)  # not a submodule: one engine, many layers

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.engine.forward(self.layer, hidden_states, top_k_index, top_k_weights)


class ForwardRecord(NamedTuple):
    """One forward pass of the offloaded model: tokens through it, wall seconds, bytes copied
    to the device, expert activations, hits and in-flight hits (so decode steps can be told
    from the prefill)."""

    tokens: int
    seconds: float
    h2d_bytes: int
    activations: int
    hits: int
    inflight_hits: int


class OffloadHandle:
    """What :func:`offload` returns: the engine, its measured costs, and the figures."""

    def __init__(self, model: nn.Module, engine: OffloadEngine, layers: list[OffloadedExperts],
                 predictors: dict, policy: str, prefetch: str, dense_bytes: int, out_modules: list,
                 poll_modules: list = ()):
        self.model = model
        self.engine = engine
        self.layers = layers
        self.policy = policy
        self.prefetch = prefetch
        self.dense_bytes = dense_bytes
        self._predictors = predictors  # prefetch mode -> per-layer predictors
        self._t0: float | None = None
        self._before = (0, 0, 0, 0, 0)
        self.forward_log: list[ForwardRecord] = []
        self._hooks = [model.register_forward_pre_hook(self._start),
                       model.register_forward_hook(self._stop)]
        self._out_modules, self._poll_modules = out_modules, list(poll_modules)
        self._prefetch_hooks: list = []
        self._install_prefetch_hooks()

    def _install_prefetch_hooks(self) -> None:
        """The hooks a prefetch needs, only while the engine prefetches (a module with hooks
        takes ``nn.Module``'s slower call path: host time on every decode step): forward hooks
        on the decoder layers ending MoE layer i, whose output feeds ``prefetch="layer_output"``,
        and pre-hooks on the modules inside each decoder layer, between the host's launches, to
        start an arrived prediction's prefetch and keep prefetch chunks queued
        (:meth:`OffloadEngine.poll`)."""
        for h in self._prefetch_hooks:
            h.remove()
        self._prefetch_hooks = []
        engine = self.engine
        if not engine.prefetching:  # no predictor of any kind: nothing to hook
            return
        for i, module in enumerate(self._out_modules):
            if module is not None and engine.out_predictors[i] is not None:
                self._prefetch_hooks.append(module.register_forward_hook(self._layer_output_hook(i)))
        for module in self._poll_modules:
            for child in module.children():
                self._prefetch_hooks.append(child.register_forward_pre_hook(self._poll_hook))

    def _layer_output_hook(self, layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            self.engine.predict_from_output(layer, h.reshape(-1, h.shape[-1]))
        return hook

    def _poll_hook(self, module, args) -> None:
        self.engine.poll()

    def _sync(self) -> None:
        if self.engine.cuda:
            torch.cuda.synchronize(self.engine.device)

    def _snapshot(self) -> tuple[int, int, int, int, int]:
        c = self.engine.counters
        return c.tokens, c.h2d_bytes, c.activations, c.hits, c.inflight_hits

    def _start(self, module, args) -> None:
        self._sync()
        self._before = self._snapshot()
        self._t0 = time.perf_counter()

    def _stop(self, module, args, output) -> None:
        if self._t0 is not None:
            self._sync()
            seconds = time.perf_counter() - self._t0
            self.engine.counters.wall_s += seconds
            delta = [a - b for a, b in zip(self._snapshot(), self._before)]
            self.forward_log.append(ForwardRecord(delta[0], seconds, *delta[1:]))
            self._t0 = None

    def reconfigure(self, *, cache_experts: int | None = None, policy: str | None = None,
                    prefetch: str | None = None, cpu_compute: bool | None = None,
                    prefetch_extra: int | None = None, lead_chunks: int | None = None,
                    staging_slots: int | None = None) -> None:
        """Start over with a new (empty) expert cache and other settings, keeping the host
        weights and the measured costs (no reload). Unset arguments keep their value."""
        old = self.engine
        policy = policy or self.policy
        prefetch = prefetch or self.prefetch
        _check_choices(policy, prefetch)
        cpu_compute = old.cpu_compute if cpu_compute is None else cpu_compute
        num_slots = old.num_slots if cache_experts is None else _check_slots(cache_experts, old)
        costs = old.costs
        if cpu_compute and costs.cpu_s_fixed == float("inf"):
            fixed, per_token = measure_cpu_expert(old.host_w_in[0][0], old.host_w_out[0][0])
            costs = TransferCosts(costs.h2d_bytes_per_s, costs.expert_bytes, fixed, per_token, CPU_ADAPT)
        if old.cuda:
            old.resolve_stalls()
        old.close()
        old.slot_in = old.slot_out = None  # free the old slots before allocating the new ones
        old.copier.slot_in = old.copier.slot_out = None
        extra = old.prefetch_extra if prefetch_extra is None else _nonnegative_int(prefetch_extra, "prefetch_extra")
        lead = old.lead_chunks if lead_chunks is None else _positive_int(lead_chunks, "lead_chunks")
        staging = old.staging_slots if staging_slots is None else _nonnegative_int(staging_slots, "staging_slots")
        self.engine = OffloadEngine(old.host_w_in, old.host_w_out, num_slots, policy, old.device, old.act_fn,
                                    costs, cpu_compute, self._predictors.get(prefetch),
                                    self._predictors.get(f"{prefetch}:out"), old.copier.chunk_bytes, lead, extra,
                                    staging_slots=staging)
        for layer in self.layers:
            object.__setattr__(layer, "engine", self.engine)
        self._install_prefetch_hooks()
        self.policy, self.prefetch = policy, prefetch
        self.forward_log = []

    @property
    def num_slots(self) -> int:
        return self.engine.num_slots

    def reset_stats(self) -> None:
        """Zero the counters (the cache keeps its contents and its use history)."""
        self.engine.resolve_stalls()
        self.engine.counters = type(self.engine.counters)()
        self.engine.copier.busy_s = self.engine.copier.sync_copy_s = 0.0
        self.forward_log = []

    def stats(self) -> dict:
        """The figures of the module doc, plus the raw counters behind them."""
        engine = self.engine
        engine.resolve_stalls()  # also waits for the CPU worker, whose counters are read below
        c = engine.counters
        bw = engine.costs.h2d_bytes_per_s
        wall = c.wall_s
        return {
            "hit_rate": c.hits / c.activations if c.activations else float("nan"),
            "inflight_hit_rate": c.inflight_hits / c.activations if c.activations else float("nan"),
            "prefetch_precision": c.predicted_used / c.predicted if c.predicted else float("nan"),
            "prefetch_recall": c.predicted_used / c.needed_after_prediction if c.needed_after_prediction else float("nan"),
            "prefetch_lead_s": c.prefetch_lead_s / c.prefetch_leads if c.prefetch_leads else float("nan"),
            "h2d_bytes_per_token": c.h2d_bytes / c.tokens if c.tokens else float("nan"),
            "stall_s": c.stall_s,
            "host_wait_s": c.host_wait_s,
            "cpu_busy_s": c.cpu_busy_s,
            "copy_busy_s": engine.copier.busy_s + engine.copier.sync_copy_s,
            "copy_busy_fraction": (engine.copier.busy_s + engine.copier.sync_copy_s) / wall if wall > 0 else float("nan"),
            "copy_bandwidth_bytes_per_s": (c.h2d_bytes / engine.copier.busy_s if engine.copier.busy_s > 0
                                           else float("nan")),
            "pcie_utilization": (c.h2d_bytes / wall) / bw if wall > 0 else float("nan"),
            "tokens_per_s": c.tokens / wall if wall > 0 else float("nan"),
            "tokens": c.tokens,
            "wall_s": wall,
            "activations": c.activations,
            "hits": c.hits,
            "inflight_hits": c.inflight_hits,
            "cpu_computed": c.cpu_computed,
            "demand_copies": c.demand_copies,
            "prefetch_copies": c.prefetch_copies,
            "prefetch_useful": c.prefetch_useful,
            "staging_slots": engine.staging_slots,
            "staged_hits": c.staged_hits,
            "staged_inflight_hits": c.staged_inflight_hits,
            "staged_misses": c.staged_misses,
            "staged_dropped": c.staged_dropped,
            "prefetch_evicted_early": c.prefetch_evicted_early,
            "victim_hits": c.victim_hits,
            "prefetch_bytes": c.prefetch_bytes,
            "prefetch_extra": engine.prefetch_extra,
            "lead_chunks": engine.lead_chunks,
            "chunk_bytes": engine.copier.chunk_bytes,
            "layer_calls": c.layer_calls,
            "h2d_bytes": c.h2d_bytes,
            "h2d_bandwidth_bytes_per_s": bw,
            "num_slots": engine.num_slots,
            "expert_bytes": engine.expert_bytes,
            "dense_bytes": self.dense_bytes,
            "policy": self.policy,
            "prefetch": self.prefetch,
            "cpu_compute": engine.cpu_compute,
        }

    def remove_hooks(self) -> None:
        """Stop timing forward passes (the model stays offloaded)."""
        for h in self._hooks + self._prefetch_hooks:
            h.remove()
        self._hooks, self._prefetch_hooks = [], []


def _tensor_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def offload(model: nn.Module, *, cache_experts: int | None = None, gpu_memory: int | str | None = None,
            policy: str = "lru", prefetch: str = "none", cpu_compute: bool = False,
            device: str | torch.device | None = None, reserve: int | str | None = None,
            prefetch_extra: int = 0, lead_chunks: int = 2, chunk_bytes: int | str = 32 * 2**20,
            staging_slots: int = 0) -> OffloadHandle:
    """Offload the routed experts of a ``transformers`` MoE ``model`` (in place).

    cache_experts: number of device expert slots; or gpu_memory: total device budget (bytes or
    "20GB"), the slots being what is left after the dense weights and ``reserve`` (activations,
    KV cache; default 10% of the budget). policy: "lru" | "lfu". prefetch: "none" |
    "next_layer" | "layer_output" | "next_layer+layer_output" (module doc). cpu_compute:
    compute a missing expert on the CPU when the measured cost model says it finishes sooner
    than its copy (the CPU figure follows the CPU experts' own times while decoding). device: default
    CUDA when available, else the CPU (tests). prefetch_extra: experts prefetched beyond the
    predicted top-k set, by predicted probability mass (they take only slots of experts ranked
    below them). lead_chunks: prefetch chunks kept queued on the copy stream (a wrong guess
    delays demand copies by at most that many chunks). chunk_bytes: copy chunk size.
    staging_slots: device slots for prefetched guesses outside the cache (module doc, "Staging";
    default 0: a guess takes a cache slot at once). With ``cache_experts`` they come on top of
    the cache's slots; with ``gpu_memory`` they are taken from the slots the budget allows.
    """
    if (cache_experts is None) == (gpu_memory is None):
        raise ValueError("cache_experts / gpu_memory: expected exactly one of them, "
                         f"got cache_experts={cache_experts!r}, gpu_memory={gpu_memory!r}")
    _check_choices(policy, prefetch)
    prefetch_extra = _nonnegative_int(prefetch_extra, "prefetch_extra")
    lead_chunks = _positive_int(lead_chunks, "lead_chunks")
    staging_slots = _nonnegative_int(staging_slots, "staging_slots")
    chunk_bytes = parse_bytes(chunk_bytes, "chunk_bytes")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if any(isinstance(m, OffloadedExperts) for m in model.modules()):
        raise ValueError("model: expected a model that is not offloaded yet")
    blocks = find_moe_blocks(model)
    shapes = {(tuple(b.module.experts.gate_up_proj.shape), b.module.experts.gate_up_proj.dtype) for b in blocks}
    if len(shapes) != 1:
        raise ValueError(f"model: expected experts of one shape and dtype in every MoE layer, got {sorted(map(str, shapes))}")

    host_in, host_out = [], []
    for b in blocks:  # one layer at a time, so the host holds at most one extra layer copy
        ex = b.module.experts
        w_in, w_out = ex.gate_up_proj.detach().to("cpu"), ex.down_proj.detach().to("cpu")
        if device.type == "cuda":
            w_in, w_out = w_in.pin_memory(), w_out.pin_memory()
        host_in.append(w_in)
        host_out.append(w_out)
        del ex.gate_up_proj, ex.down_proj
    act_fn = blocks[0].module.experts.act_fn
    dense_bytes = _tensor_bytes(model)
    model.to(device)

    w_in, w_out = host_in[0], host_out[0]
    expert_bytes = (w_in[0].numel() + w_out[0].numel()) * w_in.element_size()
    if cache_experts is not None:
        num_slots = _positive_int(cache_experts, "cache_experts")
    else:
        budget = parse_bytes(gpu_memory, "gpu_memory")
        spare = parse_bytes(reserve, "reserve") if reserve is not None else budget // 10
        num_slots = (budget - dense_bytes - spare) // expert_bytes - staging_slots
        if num_slots < 1:
            need = dense_bytes + spare + (1 + staging_slots) * expert_bytes
            raise ValueError(f"gpu_memory: expected at least {need} bytes (dense weights {dense_bytes} + reserve "
                             f"{spare} + one expert {expert_bytes} + {staging_slots} staging slots), got {budget}")
    num_slots = min(num_slots, len(blocks) * blocks[0].num_experts)

    bandwidth = measure_h2d_bandwidth(device, nbytes=min(64 * 2**20, max(expert_bytes, 2**20)))
    cpu_fixed, cpu_per_token = measure_cpu_expert(w_in[0], w_out[0]) if cpu_compute else (float("inf"), 0.0)
    costs = TransferCosts(bandwidth, expert_bytes, cpu_fixed, cpu_per_token, CPU_ADAPT)
    predictors, out_modules = _predictors(model, blocks)
    modules = dict(model.named_modules())
    poll_modules = [m for m in (modules.get(b.name.rpartition(".")[0]) for b in blocks) if m is not None]
    engine = OffloadEngine(host_in, host_out, int(num_slots), policy, device, act_fn, costs, cpu_compute,
                           predictors.get(prefetch), predictors.get(f"{prefetch}:out"), chunk_bytes,
                           lead_chunks, prefetch_extra, staging_slots=staging_slots)
    layers = [OffloadedExperts(engine, i) for i in range(len(blocks))]
    for b, layer in zip(blocks, layers):
        b.module.experts = layer
    return OffloadHandle(model, engine, layers, predictors, policy, prefetch, dense_bytes, out_modules, poll_modules)


def _predictors(model: nn.Module, blocks: list) -> tuple[dict, list]:
    """Per prefetch mode, per MoE layer ``i``, the predictor of layer ``i + 1``'s experts
    (None for the last layer): ``"next_layer"`` from layer ``i``'s router input,
    ``"layer_output:out"`` from the output of the decoder layer holding block ``i`` through
    the next decoder layer's ``post_attention_layernorm``, ``"layer_output2:out"`` the same for
    layers ``i + 1`` and ``i + 2`` (a tuple); and the decoder layers whose output feeds the
    latter (None where the model has no such norm)."""
    modules = dict(model.named_modules())
    num = len(blocks)
    early: list = [None] * num
    late: list = [None] * num
    late2: list = [None] * num
    out_modules: list = [None] * num

    def from_output(j: int):  # layer j's experts from a residual stream, through its norm and router
        norm = getattr(modules.get(blocks[j].name.rpartition(".")[0]), "post_attention_layernorm", None)
        return None if norm is None else (lambda h_TD, b=blocks[j], n=norm: predict_block(b, n(h_TD)))

    for i in range(num - 1):
        early[i] = lambda x_TD, b=blocks[i + 1]: predict_block(b, x_TD)
        parent = modules.get(blocks[i].name.rpartition(".")[0])
        nearer = from_output(i + 1)
        if parent is not None and nearer is not None:
            late[i] = nearer
            farther = from_output(i + 2) if i + 2 < num else None
            late2[i] = (nearer,) if farther is None else (nearer, farther)
            out_modules[i] = parent
    return {"next_layer": early, "layer_output:out": late, "next_layer+layer_output": early,
            "next_layer+layer_output:out": late, "layer_output2:out": late2}, out_modules


def _check_choices(policy: str, prefetch: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    if prefetch not in PREFETCH:
        raise ValueError(f"prefetch: expected one of {PREFETCH}, got {prefetch!r}")


def _nonnegative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
    return value


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _check_slots(cache_experts, engine: OffloadEngine) -> int:
    return min(_positive_int(cache_experts, "cache_experts"), len(engine.host_w_in) * engine.num_experts)
