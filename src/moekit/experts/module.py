"""Expert modules: routed experts stored as ``[E, ...]`` tensors, and dense shared experts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts.backends import get_backend
from moekit.experts.reference import ACTIVATIONS

__all__ = ["ExpertsConfig", "GroupedExperts", "SharedExperts"]


@dataclass
class ExpertsConfig:
    """dim: model width D. ffn_dim: hidden width F of one expert. num_experts: E.
    activation: "swiglu" or "gelu". backend: "auto", "sorted", "reference", or a GPU backend
    (see :mod:`moekit.experts.backends`)."""

    dim: int
    ffn_dim: int
    num_experts: int
    activation: str = "swiglu"
    backend: str = "auto"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("dim", "ffn_dim", "num_experts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")

    @property
    def in_rows(self) -> int:
        return 2 * self.ffn_dim if self.activation == "swiglu" else self.ffn_dim


class GroupedExperts(nn.Module):
    """E expert MLPs. Parameters (``transformers`` 5.x layout, see experts/reference.py):
    ``w_in`` ``[E, H, D]`` (gate and up fused for SwiGLU), ``w_out`` ``[E, D, F]``."""

    def __init__(self, cfg: ExpertsConfig):
        super().__init__()
        self.cfg = cfg
        self.w_in = nn.Parameter(torch.empty(cfg.num_experts, cfg.in_rows, cfg.dim))
        self.w_out = nn.Parameter(torch.empty(cfg.num_experts, cfg.dim, cfg.ffn_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=self.cfg.dim ** -0.5)
        nn.init.normal_(self.w_out, std=self.cfg.ffn_dim ** -0.5)

    def forward(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """x_TD ``[T, D]``, indices_TK ``[T, K]`` (``-1`` = none), weights_TK ``[T, K]`` -> ``[T, D]``."""
        fn = get_backend(self.cfg.backend, x_TD.device)
        w_in, w_out = self.w_in, self.w_out
        if w_in.dtype != x_TD.dtype:  # autocast does not reach custom kernels: cast explicitly
            w_in, w_out = w_in.to(x_TD.dtype), w_out.to(x_TD.dtype)
        return fn(x_TD, indices_TK, weights_TK, w_in, w_out, self.cfg.activation)


class SharedExperts(nn.Module):
    """Always-on experts (DeepSeek / Qwen2-MoE style) as one dense MLP of width
    ``num_shared * ffn_dim``; optional sigmoid gate per token (Qwen2-MoE)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "swiglu", gated: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        rows = 2 * hidden_dim if activation == "swiglu" else hidden_dim
        self.w_in = nn.Linear(dim, rows, bias=False)
        self.w_out = nn.Linear(hidden_dim, dim, bias=False)
        self.gate = nn.Linear(dim, 1, bias=False) if gated else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x_TD)
        if self.activation == "swiglu":
            g, u = h.chunk(2, dim=-1)
            h = F.silu(g) * u
        else:
            h = F.gelu(h)
        y = self.w_out(h)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x_TD)) * y
        return y
