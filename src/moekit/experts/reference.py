"""Slow, obviously-correct expert computation: one token, one chosen expert at a time.

Weight layout (shared by every backend, and identical to ``transformers`` 5.x fused experts so
Hugging Face weights can be used without a copy):

- ``w_in_EHD``: ``[E, H, D]`` with ``H = 2F`` for SwiGLU (rows ``[:F]`` gate, ``[F:]`` up) or
  ``H = F`` for GELU;
- ``w_out_EDF``: ``[E, D, F]``.

``y[t] = sum_j weights[t, j] * expert_{indices[t, j]}(x[t])``, skipping slots with index ``-1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "connect", "expert_mlp", "experts_reference"]

ACTIVATIONS = ("swiglu", "gelu")


def expert_mlp(x_ND: torch.Tensor, w_in_HD: torch.Tensor, w_out_DF: torch.Tensor, activation: str) -> torch.Tensor:
    """One expert's MLP on ``[N, D]`` rows: ``[N, D]`` out."""
    h_NH = x_ND @ w_in_HD.t()
    if activation == "swiglu":
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        a_NF = F.silu(gate_NF) * up_NF
    elif activation == "gelu":
        a_NF = F.gelu(h_NH)
    else:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return a_NF @ w_out_DF.t()


def connect(out_TD: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """``out_TD`` plus an exact zero that depends on every tensor of ``inputs`` (sums of empty
    slices: no arithmetic on their values). A call whose routing chose nothing then still
    gives zero, not missing, gradients to every input, and every autograd path through it runs:
    DDP and optimizers see the weights, and an expert-parallel rank none of whose slots is
    chosen still runs the backward of the collectives that fed it."""
    zero = sum(t[:0].sum() for t in inputs)
    return out_TD + zero.to(out_TD.dtype)


def experts_reference(
    x_TD: torch.Tensor,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Per-token loop. ``[T, D]`` out, in ``x_TD.dtype``. Differentiable in every input."""
    rows = []
    for t in range(x_TD.shape[0]):
        acc_D = x_TD.new_zeros(x_TD.shape[1])
        for j in range(indices_TK.shape[1]):
            e = int(indices_TK[t, j])
            if e < 0:
                continue
            y_D = expert_mlp(x_TD[t : t + 1], w_in_EHD[e], w_out_EDF[e], activation)[0]
            acc_D = acc_D + weights_TK[t, j].to(y_D.dtype) * y_D
        rows.append(acc_D)
    out_TD = torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[1])
    # a row whose slots are all -1 is a fresh zero vector: keep every input in the graph
    return connect(out_TD, x_TD, weights_TK, w_in_EHD, w_out_EDF)
