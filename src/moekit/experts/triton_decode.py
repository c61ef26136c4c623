"""Triton kernels for decode-sized expert compute (a handful of token-expert slots).

With ``S = T*K`` small, the expert MLPs are matrix-vector products and the time is the time
to read the chosen experts' weights. Sorting by expert would cost more than it saves, so
these kernels work per slot, straight from ``indices_TK``:

1. :func:`slot_gate_up`: ``a[s] = act(W_in[e_s] @ x[t_s])``, one program per (slot,
   block of ``F``), gate and up rows read together, fp32 accumulation, activation fused;
2. :func:`slot_down`: ``y[s] = W_out[e_s] @ a[s]``, one program per (slot, block of ``D``);
3. the weighted sum over each token's slots is :func:`moekit.experts.triton_kernels.gather_sum`.

A slot with index ``-1`` reads no weight and yields a zero row. Each slot reads its expert's
weights once; a token's ``K`` experts are distinct, so at ``T = 1`` every active expert is read
exactly once (at larger ``T`` slots that share an expert re-read it, mostly from L2).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["slot_gate_up", "slot_down"]

_SQRT1_2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _slot_gate_up_kernel(x_ptr, idx_ptr, w_ptr, a_ptr, K: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
                         SWIGLU: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    e = tl.load(idx_ptr + s)
    live = e >= 0
    tok = (s // K).to(tl.int64)
    H: tl.constexpr = 2 * F if SWIGLU else F
    w_e = w_ptr + tl.maximum(e, 0).to(tl.int64) * H * D
    acc_g = tl.zeros([BLOCK_F], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_F], dtype=tl.float32)
    in_f = (rows < F) & live
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        in_d = cols < D
        xv = tl.load(x_ptr + tok * D + cols, mask=in_d, other=0.0).to(tl.float32)
        m2 = in_f[:, None] & in_d[None, :]
        wg = tl.load(w_e + rows[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        acc_g += tl.sum(wg * xv[None, :], axis=1)
        if SWIGLU:
            wu = tl.load(w_e + (F + rows[:, None]) * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            acc_u += tl.sum(wu * xv[None, :], axis=1)
    if SWIGLU:
        a = acc_g * tl.sigmoid(acc_g) * acc_u
    else:
        a = 0.5 * acc_g * (1.0 + tl.erf(acc_g * _SQRT1_2))
    tl.store(a_ptr + s.to(tl.int64) * F + rows, a.to(a_ptr.dtype.element_ty), mask=rows < F)


@triton.jit
def _slot_down_kernel(a_ptr, idx_ptr, w_ptr, y_ptr, D: tl.constexpr, F: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    s = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    e = tl.load(idx_ptr + s)
    live = e >= 0
    w_e = w_ptr + tl.maximum(e, 0).to(tl.int64) * D * F
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    in_d = (rows < D) & live
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        in_f = cols < F
        av = tl.load(a_ptr + s.to(tl.int64) * F + cols, mask=in_f, other=0.0).to(tl.float32)
        wv = tl.load(w_e + rows[:, None] * F + cols[None, :], mask=in_d[:, None] & in_f[None, :], other=0.0)
        acc += tl.sum(wv.to(tl.float32) * av[None, :], axis=1)
    tl.store(y_ptr + s.to(tl.int64) * D + rows, acc.to(y_ptr.dtype.element_ty), mask=rows < D)


def _tuned(kernel, block_rows: str, block_cols: str):
    """``kernel`` autotuned over tile shapes and warps, keyed on the problem shape (the first
    call of a shape times each config once; Triton's interpreter gets the plain kernel)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    shapes = [(16, 256, 4, 3), (8, 512, 4, 3), (32, 128, 4, 3), (16, 512, 8, 3), (32, 256, 8, 4), (8, 256, 2, 4),
              (4, 1024, 4, 3)]
    configs = [triton.Config({block_rows: r, block_cols: c}, num_warps=w, num_stages=st) for r, c, w, st in shapes]
    return triton.autotune(configs, key=["D", "F", "K"] if "K" in kernel.arg_names else ["D", "F"])(kernel)


_GATE_UP_TUNED = _tuned(_slot_gate_up_kernel, "BLOCK_F", "BLOCK_D")
_DOWN_TUNED = _tuned(_slot_down_kernel, "BLOCK_D", "BLOCK_F")


def slot_gate_up(x_TD: torch.Tensor, indices_TK: torch.Tensor, w_in_EHD: torch.Tensor, activation: str) -> torch.Tensor:
    """``[T, D]``, ``[T, K]``, ``[E, H, D]`` -> ``a_SF [T*K, F]`` (zero rows for ``-1`` slots)."""
    T, K = indices_TK.shape
    D = x_TD.shape[1]
    swiglu = activation == "swiglu"
    F = w_in_EHD.shape[1] // 2 if swiglu else w_in_EHD.shape[1]
    a_SF = torch.empty(T * K, F, dtype=x_TD.dtype, device=x_TD.device)
    if _GATE_UP_TUNED is not None:
        grid = lambda meta: (T * K, triton.cdiv(F, meta["BLOCK_F"]))  # noqa: E731
        _GATE_UP_TUNED[grid](x_TD, indices_TK, w_in_EHD, a_SF, K=K, D=D, F=F, SWIGLU=swiglu)
        return a_SF
    block_f, block_d = 16, min(256, triton.next_power_of_2(D))
    _slot_gate_up_kernel[(T * K, triton.cdiv(F, block_f))](
        x_TD, indices_TK, w_in_EHD, a_SF, K=K, D=D, F=F, SWIGLU=swiglu, BLOCK_F=block_f, BLOCK_D=block_d,
        num_warps=4)
    return a_SF


def slot_down(a_SF: torch.Tensor, indices_TK: torch.Tensor, w_out_EDF: torch.Tensor) -> torch.Tensor:
    """``[S, F]``, ``[T, K]``, ``[E, D, F]`` -> ``y_SD [S, D]`` (unweighted expert outputs)."""
    S, F = a_SF.shape
    D = w_out_EDF.shape[1]
    y_SD = torch.empty(S, D, dtype=a_SF.dtype, device=a_SF.device)
    if _DOWN_TUNED is not None:
        grid = lambda meta: (S, triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
        _DOWN_TUNED[grid](a_SF, indices_TK, w_out_EDF, y_SD, D=D, F=F)
        return y_SD
    block_d, block_f = 16, min(256, triton.next_power_of_2(F))
    _slot_down_kernel[(S, triton.cdiv(D, block_d))](
        a_SF, indices_TK, w_out_EDF, y_SD, D=D, F=F, BLOCK_D=block_d, BLOCK_F=block_f, num_warps=4)
    return y_SD
