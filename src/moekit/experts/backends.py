"""Expert-computation backends: name -> function with the contract of
:func:`moekit.experts.reference.experts_reference`.

``auto`` picks the fastest backend for the device: the sorted per-expert loop on CPU, the
grouped-GEMM path on CUDA when it is available. Backends are imported lazily so that a CPU
install never imports GPU kernels.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

__all__ = ["BACKENDS", "get_backend", "resolve_backend"]

# name -> "module:function"
BACKENDS: dict[str, str] = {
    "reference": "moekit.experts.reference:experts_reference",
    "sorted": "moekit.experts.sorted:experts_sorted",
    # Sort + torch._grouped_mm + fused Triton activation / un-permute, behind custom ops
    # (torch.compile-able). Runs on CPU too (torch's grouped-GEMM CPU kernel), but ``auto``
    # picks it on CUDA only: on CPU the per-expert loop of "sorted" is as fast and simpler.
    "grouped_mm": "moekit.experts.grouped:experts_grouped_mm",
}


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend name ``auto`` stands for on ``device`` (other names unchanged)."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"backend: expected 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
        return name
    if device.type == "cuda" and "grouped_mm" in BACKENDS:
        return "grouped_mm"
    return "sorted"


def get_backend(name: str, device: torch.device) -> Callable[..., torch.Tensor]:
    module_name, fn_name = BACKENDS[resolve_backend(name, device)].split(":")
    return getattr(importlib.import_module(module_name), fn_name)
