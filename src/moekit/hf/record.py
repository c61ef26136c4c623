"""Record which experts a Hugging Face MoE model uses, step by step, into a routing trace.

``with record_routing(model) as rec: model(...)`` counts, for every forward pass of ``model``
(one *step*: a training batch, a prefill, or one decode step of ``generate``) and every MoE
layer, how many token-to-expert assignments each expert got. ``rec.trace()`` returns a
:class:`moekit.trace.RoutingTrace` (counts ``[steps, layers, experts]``); ``rec.save(path)``
writes it atomically as ``.npz``.

The counts are read from the routers' own outputs through forward hooks (no extra compute): on
an unpatched model from each block's ``gate`` (``(logits, weights, indices)``), on a model
patched by :func:`moekit.hf.patch` from the moekit router's ``Routing``. Counts stay on the
model's device until the step ends, so recording adds no host synchronisation per layer.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import nn

from moekit.hf.families import find_moe_blocks
from moekit.hf.patch import PatchedMoE
from moekit.trace import RoutingTrace, save_trace

__all__ = ["RoutingRecorder", "record_routing"]


class RoutingRecorder:
    """Accumulates per-step, per-layer expert counts of one model (see module doc).

    layers: the MoE modules in execution order. num_experts / top_k: routing shape (equal in
    every layer). model_name: stored in the trace metadata.
    """

    def __init__(self, layers: list[nn.Module], num_experts: int, top_k: int, model_name: str):
        self.layers = layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.model_name = model_name
        self._steps: list[np.ndarray] = []  # finished steps, int64 [L, E] each
        self._tokens: list[int] = []
        self._current_LE: torch.Tensor | None = None
        self._current_tokens = 0

    def start_step(self) -> None:
        """Close the running step (if any) and open a new one."""
        self._flush()
        self._current_LE = None
        self._current_tokens = 0

    def add(self, layer: int, indices_TK: torch.Tensor) -> None:
        """Count the assignments ``indices_TK [T, k]`` of MoE layer ``layer`` (``-1`` ignored)."""
        flat = indices_TK.detach().reshape(-1).to(torch.int64)
        if self._current_LE is None:
            self._current_LE = torch.zeros(len(self.layers), self.num_experts, dtype=torch.int64, device=flat.device)
        flat = flat[(flat >= 0) & (flat < self.num_experts)]
        self._current_LE[layer] += torch.bincount(flat, minlength=self.num_experts).to(self._current_LE.device)
        if layer == 0:
            self._current_tokens += int(indices_TK.shape[0])

    def _flush(self) -> None:
        if self._current_LE is not None:
            self._steps.append(self._current_LE.cpu().numpy())
            self._tokens.append(self._current_tokens)
            self._current_LE = None

    def trace(self) -> RoutingTrace:
        """The recorded steps as a :class:`RoutingTrace`. ``tokens_per_step`` is the number of
        tokens of every step when they are all equal, else their maximum; the exact list is kept
        under the metadata key ``tokens``."""
        self._flush()
        if not self._steps:
            raise ValueError("record_routing: no forward pass was recorded (expected at least one step)")
        counts = np.stack(self._steps)
        meta = {"model": self.model_name, "num_experts": self.num_experts, "top_k": self.top_k,
                "tokens_per_step": int(max(self._tokens)), "tokens": [int(t) for t in self._tokens],
                "source": "moekit.hf.record_routing"}
        return RoutingTrace(counts=counts, metadata=meta)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`trace` to ``path`` (``.npz``, atomic)."""
        save_trace(path, self.trace())


def _routed_layers(model: nn.Module) -> list[tuple[nn.Module, nn.Module, int, int]]:
    """``(layer, router, num_experts, top_k)`` per MoE layer, patched or not, in module order."""
    patched = [m for m in model.modules() if isinstance(m, PatchedMoE)]
    if patched:
        return [(m, m.router, m.cfg.num_experts, m.cfg.top_k) for m in patched]
    return [(b.module, b.module.gate, b.num_experts, b.top_k) for b in find_moe_blocks(model)]


def _indices_from(output) -> torch.Tensor | None:
    if hasattr(output, "routing"):  # moekit RouterOutput
        return output.routing.indices
    if isinstance(output, tuple) and len(output) == 3:  # HF (logits, weights, indices)
        return output[2]
    return None


@contextmanager
def record_routing(model: nn.Module, model_name: str | None = None) -> Iterator[RoutingRecorder]:
    """Record the routing of every forward pass of ``model`` inside the ``with`` block.

    Yields a :class:`RoutingRecorder`; hooks are removed on exit. Raises ``ValueError`` for a
    model without supported MoE blocks or with layers of different expert counts.
    """
    layers = _routed_layers(model)
    shapes = {(e, k) for _, _, e, k in layers}
    if len(shapes) != 1:
        raise ValueError(f"model: expected every MoE layer to have the same (num_experts, top_k), got {sorted(shapes)}")
    num_experts, top_k = shapes.pop()
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    rec = RoutingRecorder([m for m, _, _, _ in layers], num_experts, top_k, name)
    handles = [model.register_forward_pre_hook(lambda mod, args: rec.start_step())]
    for i, (layer, router, _, _) in enumerate(layers):
        def hook(mod, args, output, i=i, layer=layer):
            indices = _indices_from(output)
            if indices is None:  # DeepSeek-V3 router of early 5.x releases returns logits only
                indices, _ = layer.route_tokens_to_experts(output)
            rec.add(i, indices)
        handles.append(router.register_forward_hook(hook))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()
        rec._flush()
