"""CUDA graphs of the dense parts of a decode step: ``graph_decode(model)``.

An offloaded decode step at batch 1 is paced by the host: while ``transformers`` launches a
layer's norms, attention and router one small kernel at a time (tens of launches per layer),
the copy engine has nothing to copy, since a layer's routing says what to copy only once it is
computed. This module replays those launches from CUDA graphs. It wraps, per decoder layer that
holds a MoE block, every child of the layer except the block (norms, attention) and every child
of the block except ``experts`` (router, shared experts); a decoder layer without a MoE block is
wrapped whole; and the base model's ``rotary_emb`` and final ``norm``. The routed experts stay
eager: the offload engine reads their routing on the host and copies weights in between.

A wrapped module's call is captured the third time it is seen with the same *signature* (shapes,
strides, dtypes and devices of its tensor arguments, values of its plain arguments, identity of
its cache) and replayed from then on: its tensor arguments are copied into the graph's static
inputs (skipped when the argument already *is* that buffer, e.g. ``rotary_emb``'s graph output
fed to every attention) and the graph's own output tensors are returned. A call runs eagerly
when it could not be replayed faithfully:

- autograd is on, a tensor is not on a CUDA device, or the call has more than ``max_tokens``
  tokens (a prefill: a new shape each prompt);
- an argument is an object other than a cache that ``transformers`` marks compileable
  (``cache.is_compileable``: a static cache, updated in place on the device). A
  ``DynamicCache`` grows by re-binding Python attributes, which a replay would skip, so calls
  with one never replay. Use ``model.generate(..., cache_implementation="static")``;
- the signature's second eager call synchronised with the host (torch's sync debug check is on
  during that call): a capture of it would fail, and a failed capture can leave torch's own
  capture state (e.g. the RNG's) inconsistent, so it is never tried. A capture that fails
  anyway raises ``RuntimeError``.

Outputs of a replay are the graph's buffers: valid until the same module is called again with
the same signature (the next decode step), which is how ``transformers`` uses them. Replayed
kernels are the eager ones, so outputs are bit-identical to eager calls with the same inputs.
``transformers`` compiles the whole forward by itself when it sees a static cache on CUDA;
``graph_decode`` sets ``model.generation_config.disable_compile`` (restored by ``remove``), since
an offloaded model synchronises with the host inside every MoE layer.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from moekit.hf.families import block_family

__all__ = ["DecodeGraphs", "GraphedCall", "graph_decode", "graph_key", "graph_targets", "static_cache_kwargs"]


def _compileable_cache(obj) -> bool:
    return getattr(obj, "is_compileable", False) is True and not getattr(obj, "offloading", False)


def graph_key(args: tuple, kwargs: dict, max_tokens: int, device_type: str = "cuda") -> tuple | None:
    """The capture signature of one call ``(args, kwargs)``, or ``None`` if it must run eagerly
    (module doc). Tokens are counted on the first tensor: every dimension but the last.
    device_type: the device every tensor must be on (graphs are captured on CUDA)."""
    return _signature(args, kwargs, max_tokens, device_type)[0]


def _signature(args: tuple, kwargs: dict, max_tokens: int, device_type: str = "cuda") -> tuple[tuple | None, list]:
    """(:func:`graph_key`, the call's tensor arguments in flattening order)."""
    if torch.is_grad_enabled():
        return None, []
    leaves, spec = tree_flatten((args, kwargs))
    parts, tensors = [], []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            if x.device.type != device_type:
                return None, []
            tensors.append(x)
            parts.append((tuple(x.shape), x.stride(), x.dtype, x.device))
        elif x is None or isinstance(x, (bool, int, float, str)):
            parts.append((type(x), x))
        elif _compileable_cache(x):
            parts.append(("cache", id(x)))
        else:
            return None, []
    if not tensors or tensors[0].numel() // max(tensors[0].shape[-1], 1) > max_tokens:
        return None, []
    return (spec, tuple(parts)), tensors


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list  # static input tensors, in the order of the call's tensor leaves
    output: object  # what the captured call returned (its tensors live in the graph's pool)
    keep: list = field(default_factory=list)  # objects the key refers to by id (kept alive)


class GraphedCall:
    """Stands in for one module's ``forward`` (module doc): eager until a signature has been
    seen ``warmup`` times (the last of them with torch's synchronisation check: a call that
    synchronises with the host is never captured), then captured once and replayed. Keeps at
    most ``max_graphs`` signatures (least recently used dropped), e.g. one per batch size."""

    def __init__(self, forward, pool, max_tokens: int, warmup: int = 2, max_graphs: int = 4, name: str = "module"):
        self.forward = forward
        self.name = name
        self.pool = pool
        self.max_tokens, self.warmup, self.max_graphs = max_tokens, warmup, max_graphs
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.seen: dict[tuple, int] = {}
        self.uncapturable: set[tuple] = set()
        self.replays = self.eager_calls = 0

    def __call__(self, *args, **kwargs):
        key, tensors = _signature(args, kwargs, self.max_tokens)
        if key is None or key in self.uncapturable:
            self.eager_calls += 1
            return self.forward(*args, **kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.seen) > 64:  # signatures that never repeat (a growing shape) are not kept
                self.seen.clear()
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] < self.warmup:
                self.eager_calls += 1
                return self.forward(*args, **kwargs)
            if self.seen[key] == self.warmup:
                return self._eager_checked(key, args, kwargs)
            try:
                entry = self._capture(key, args, kwargs)
            except RuntimeError as exc:  # a failed capture can leave torch's capture state (e.g. the RNG's) inconsistent
                raise RuntimeError(f"graph_decode: capturing {self.name} failed ({exc}); decode without graphs "
                                   "(DecodeGraphs.remove()) in a new process") from exc
        else:
            self.graphs.move_to_end(key)
            for static, x in zip(entry.inputs, tensors):
                if static.data_ptr() != x.data_ptr():
                    static.copy_(x)
        entry.graph.replay()
        self.replays += 1
        return entry.output

    def _eager_checked(self, key: tuple, args: tuple, kwargs: dict):
        """The last eager call of a signature, with torch's synchronisation check on: a call
        that reads device values on the host (``.item()``, ``nonzero``...) cannot be captured,
        so its signature stays eager instead of failing inside a capture."""
        self.eager_calls += 1
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = self.forward(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        for w in caught:
            if "synchroniz" in str(w.message):
                self.uncapturable.add(key)
                self.seen.pop(key, None)
            else:  # not ours: pass it on
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return out

    def _capture(self, key: tuple, args: tuple, kwargs: dict) -> _Graph:
        leaves, spec = tree_flatten((args, kwargs))
        # a tensor some graph of this pool returned keeps its address: use it as is (no copy per replay)
        statics = [x if isinstance(x, torch.Tensor) and self.pool.owns(x) else
                   (x.clone() if isinstance(x, torch.Tensor) else x) for x in leaves]
        s_args, s_kwargs = tree_unflatten(statics, spec)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool.handle, capture_error_mode="thread_local"):
            output = self.forward(*s_args, **s_kwargs)
        self.pool.adopt(output)
        entry = _Graph(graph, [x for x in statics if isinstance(x, torch.Tensor)], output,
                       [x for x in leaves if _compileable_cache(x)])
        self.graphs[key] = entry
        self.seen.pop(key, None)
        while len(self.graphs) > self.max_graphs:
            self.pool.release(self.graphs.popitem(last=False)[1].output)
        return entry


class _Pool:
    """One CUDA graph memory pool shared by every graph of a :class:`DecodeGraphs` (they replay
    one at a time, in stream order), and the addresses of the tensors its graphs return."""

    def __init__(self):
        self.handle = torch.cuda.graph_pool_handle()
        self.outputs: set[int] = set()

    def adopt(self, output) -> None:
        for x in tree_flatten(output)[0]:
            if isinstance(x, torch.Tensor):
                self.outputs.add(x.data_ptr())

    def release(self, output) -> None:
        for x in tree_flatten(output)[0]:
            if isinstance(x, torch.Tensor):
                self.outputs.discard(x.data_ptr())

    def owns(self, x: torch.Tensor) -> bool:
        return x.data_ptr() in self.outputs


def graph_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every module :func:`graph_decode` wraps (module doc), in
    model order. Raises ``ValueError`` when ``model`` has no supported MoE block."""
    names = {id(m): n for n, m in model.named_modules()}
    blocks = [m for m in model.modules() if block_family(m) is not None]
    if not blocks:
        raise ValueError(f"model: expected a transformers model with supported MoE blocks, found none in "
                         f"{type(model).__name__}")
    block_ids = {id(b) for b in blocks}
    targets: list[nn.Module] = []
    layer_lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)
                   and any(id(c) in block_ids for layer in m for c in layer.children())]
    for layers in layer_lists:
        base = next((m for m in model.modules() if any(c is layers for c in m.children())), None)
        for attr in ("rotary_emb", "norm"):
            if base is not None and isinstance(getattr(base, attr, None), nn.Module):
                targets.append(getattr(base, attr))
        for layer in layers:
            block = next((c for c in layer.children() if id(c) in block_ids), None)
            if block is None:
                targets.append(layer)
                continue
            targets += [c for c in layer.children() if c is not block]
            targets += [c for n, c in block.named_children() if n != "experts"]
    return [(names[id(m)], m) for m in targets]


class DecodeGraphs:
    """What :func:`graph_decode` returns: the wrapped calls by module name, their counts, and
    :meth:`remove`."""

    def __init__(self, model: nn.Module, max_tokens: int):
        self.model = model
        self.pool = _Pool()
        self.calls: dict[str, GraphedCall] = {}
        self._modules: list[nn.Module] = []
        config = getattr(model, "generation_config", None)
        self._disable_compile = getattr(config, "disable_compile", None)
        if config is not None:
            config.disable_compile = True
        for name, module in graph_targets(model):
            call = GraphedCall(module.forward, self.pool, max_tokens, name=name)
            module.forward = call  # instance attribute: nn.Module.__call__ (and its hooks) call it
            self.calls[name] = call
            self._modules.append(module)

    def stats(self) -> dict:
        """``graphs`` captured and alive, ``replays`` and ``eager_calls`` of the wrapped modules."""
        return {"modules": len(self.calls), "graphs": sum(len(c.graphs) for c in self.calls.values()),
                "replays": sum(c.replays for c in self.calls.values()),
                "eager_calls": sum(c.eager_calls for c in self.calls.values())}

    def remove(self) -> None:
        """Restore every module's own ``forward``, free the graphs and restore
        ``generation_config.disable_compile``."""
        for module in self._modules:
            if isinstance(module.__dict__.get("forward"), GraphedCall):
                del module.forward
        self._modules, self.calls = [], {}
        config = getattr(self.model, "generation_config", None)
        if config is not None:
            config.disable_compile = self._disable_compile


def static_cache_kwargs(model: nn.Module, cache) -> dict:
    """``model.generate`` keyword arguments that decode with ``cache`` (e.g. a
    ``transformers.StaticCache``), under the name this ``transformers`` takes it by (``cache``
    since 5.2x, ``past_key_values`` before), and without ``generate``'s own compiling (which a
    static cache would start, and an offloaded model cannot take: it synchronises with the host
    in every MoE layer)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "disable_compile": True}


def graph_decode(model: nn.Module, *, max_tokens: int = 8) -> DecodeGraphs:
    """Replay the dense parts of ``model``'s decode steps from CUDA graphs (module doc).

    model: a ``transformers`` MoE model on a CUDA device, offloaded or not (the routed experts
    stay eager either way). max_tokens: calls with more tokens (batch x new tokens) run eagerly.
    Decode with a static cache (``cache_implementation="static"``) for the graphs to replay.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens: expected a positive int, got {max_tokens!r}")
    if not torch.cuda.is_available():
        raise ValueError("model: CUDA graphs need a CUDA device; none is available")
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cuda"}:
        raise ValueError(f"model: expected every parameter on a CUDA device, found {sorted(devices)}")
    if any(isinstance(m.__dict__.get("forward"), GraphedCall) for m in model.modules()):
        raise ValueError("model: expected a model without decode graphs (call remove() on the first)")
    return DecodeGraphs(model, max_tokens)
