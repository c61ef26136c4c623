"""Triton kernels for the memory-bound steps of the grouped expert path.

The two grouped GEMMs run in ``torch._grouped_mm`` (CUTLASS on Hopper); everything between
them is fused here so that each intermediate crosses device memory once:

- :func:`act_forward`: SwiGLU / GELU of the gate+up output ``h_NH`` -> ``a_NF``.
- :func:`act_backward`: from ``h_NH``, the unweighted ``da_NF`` and the routing weight of
  each row, writes ``dh_NH``, the *weighted* activation ``w * a`` (what the down-projection
  weight gradient needs) and the routing-weight gradient ``<da, a>`` of each row. Recomputing
  ``a`` here means the forward saves only ``h`` and never the expert outputs.
- :func:`scatter_rows`: ``out[inv[t, j]] = src[t]`` for every live slot: the token rows in
  expert order, each source row read once and written ``K`` times (the permutation before the
  first grouped GEMM, and of the output gradient before the backward GEMMs).
- :func:`gather_sum`: ``out[t] = sum_j w[t, j] * src[inv[t, j]]`` over the ``K`` slots of a
  token (``inv = -1`` skips a slot), fp32 accumulation, no atomics (deterministic). It is the
  weighted un-permute of the forward and, without weights, the input gradient of the gather.

Rows ``>= n_valid = offs[E-1]`` of the sorted buffers hold the assignments of ``-1`` slots;
``torch._grouped_mm`` leaves them unwritten, so every kernel masks them out.

``F`` and ``K`` are compile-time constants (one specialisation per model shape): the loops
over them unroll, and Triton's interpreter needs constant loop bounds.

Shapes: ``N = T*K`` sorted rows, ``F`` expert hidden width, ``H = 2F`` (SwiGLU) or ``F`` (GELU),
``D`` model width. The kernels run in Triton's interpreter too (``TRITON_INTERPRET=1``), which
is how they are tested without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["act_forward", "act_backward", "gather_sum", "scatter_rows"]

# Module constants reach a @triton.jit body only as tl.constexpr.
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _act_fwd_kernel(h_ptr, a_ptr, offs_ptr, last, F: tl.constexpr, stride_h, stride_a,
                    SWIGLU: tl.constexpr, BLOCK_F: tl.constexpr):
    row = tl.program_id(0)
    n_valid = tl.load(offs_ptr + last)
    # Rows of -1 slots (fixed-size expert-parallel buffers can be half of them) do no work.
    if row >= n_valid:
        return
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    h_row = h_ptr + row.to(tl.int64) * stride_h
    if SWIGLU:
        g = tl.load(h_row + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_row + F + cols, mask=mask, other=0.0).to(tl.float32)
        a = g * tl.sigmoid(g) * u
    else:
        v = tl.load(h_row + cols, mask=mask, other=0.0).to(tl.float32)
        a = 0.5 * v * (1.0 + tl.erf(v * _SQRT1_2))
    tl.store(a_ptr + row.to(tl.int64) * stride_a + cols, a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_bwd_kernel(h_ptr, dau_ptr, w_ptr, order_ptr, offs_ptr, last,
                    dh_ptr, aw_ptr, dwr_ptr, F: tl.constexpr, stride_h, stride_da, stride_dh, stride_aw,
                    SWIGLU: tl.constexpr, BLOCK_F: tl.constexpr):
    row = tl.program_id(0)
    n_valid = tl.load(offs_ptr + last)
    if row >= n_valid:  # a -1 slot's row: nothing to compute, its outputs are never read
        return
    slot = tl.load(order_ptr + row)
    w = tl.load(w_ptr + slot).to(tl.float32)
    r64 = row.to(tl.int64)
    acc = tl.zeros([BLOCK_F], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = cols < F
        dau = tl.load(dau_ptr + r64 * stride_da + cols, mask=mask, other=0.0).to(tl.float32)
        if SWIGLU:
            g = tl.load(h_ptr + r64 * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(h_ptr + r64 * stride_h + F + cols, mask=mask, other=0.0).to(tl.float32)
            s = tl.sigmoid(g)
            silu = g * s
            a = silu * u
            da = w * dau
            dg = da * u * (s * (1.0 + g * (1.0 - s)))
            du = da * silu
            tl.store(dh_ptr + r64 * stride_dh + cols, dg.to(dh_ptr.dtype.element_ty), mask=mask)
            tl.store(dh_ptr + r64 * stride_dh + F + cols, du.to(dh_ptr.dtype.element_ty), mask=mask)
        else:
            v = tl.load(h_ptr + r64 * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            cdf = 0.5 * (1.0 + tl.erf(v * _SQRT1_2))
            a = v * cdf
            dv = w * dau * (cdf + v * tl.exp(-0.5 * v * v) * _INV_SQRT_2PI)
            tl.store(dh_ptr + r64 * stride_dh + cols, dv.to(dh_ptr.dtype.element_ty), mask=mask)
        acc += dau * a
        tl.store(aw_ptr + r64 * stride_aw + cols, (w * a).to(aw_ptr.dtype.element_ty), mask=mask)
    tl.store(dwr_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def _gather_sum_kernel(src_ptr, inv_ptr, w_ptr, out_ptr, K: tl.constexpr, D, stride_src, stride_out,
                       HAS_W: tl.constexpr, DIRECT: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(0, K):
        if DIRECT:  # src rows are the slots themselves (decode path)
            r = t * K + j
        else:
            r = tl.load(inv_ptr + t * K + j)
        v = tl.load(src_ptr + r.to(tl.int64) * stride_src + cols, mask=in_d & (r >= 0), other=0.0)
        v = v.to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + t * K + j).to(tl.float32)
        acc += v
    tl.store(out_ptr + t.to(tl.int64) * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=in_d)


@triton.jit
def _scatter_rows_kernel(src_ptr, inv_ptr, out_ptr, K: tl.constexpr, D, stride_src, stride_out,
                         BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < D
    # One read of the token row, K row writes: index_select by sorted row instead reads each
    # source row K times and runs at about half the copy bandwidth (H100, bench_layer_steps).
    v = tl.load(src_ptr + t.to(tl.int64) * stride_src + cols, mask=in_d).to(out_ptr.dtype.element_ty)
    for j in range(0, K):
        r = tl.load(inv_ptr + t * K + j)
        tl.store(out_ptr + r.to(tl.int64) * stride_out + cols, v, mask=in_d & (r >= 0))


def _block(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(n, 16)), cap)


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4 if block >= 512 else 2


def act_forward(h_NH: torch.Tensor, offs_E: torch.Tensor, activation: str) -> torch.Tensor:
    """``[N, H]`` gate+up output -> ``[N, F]`` activation (rows past ``offs_E[-1]`` unwritten)."""
    swiglu = activation == "swiglu"
    N, H = h_NH.shape
    F = H // 2 if swiglu else H
    a_NF = torch.empty(N, F, dtype=h_NH.dtype, device=h_NH.device)
    if N == 0:
        return a_NF
    block = _block(F, 1024)
    grid = (N, triton.cdiv(F, block))
    _act_fwd_kernel[grid](h_NH, a_NF, offs_E, offs_E.numel() - 1, F, h_NH.stride(0), a_NF.stride(0),
                          SWIGLU=swiglu, BLOCK_F=block, num_warps=_warps(block))
    return a_NF


def act_backward(h_NH, dau_NF, weights_flat, order_N, offs_E, activation):
    """Backward of the activation fused with the routing weight.

    h_NH ``[N, H]`` saved gate+up output; dau_NF ``[N, F]`` gradient of the *unweighted*
    expert hidden (``dout[token] @ W_out``); weights_flat ``[T*K]`` routing weights;
    order_N ``[N]`` the slot of each sorted row. Returns ``dh_NH [N, H]``,
    ``aw_NF = w * act(h)`` ``[N, F]`` and ``dw_N = <dau, act(h)>`` ``[N]`` (fp32).
    """
    swiglu = activation == "swiglu"
    N, H = h_NH.shape
    F = dau_NF.shape[1]
    dh_NH = torch.empty_like(h_NH)
    aw_NF = torch.empty(N, F, dtype=h_NH.dtype, device=h_NH.device)
    dw_N = torch.empty(N, dtype=torch.float32, device=h_NH.device)
    if N == 0:
        return dh_NH, aw_NF, dw_N
    block = _block(F, 1024)
    _act_bwd_kernel[(N,)](h_NH, dau_NF, weights_flat, order_N, offs_E, offs_E.numel() - 1,
                          dh_NH, aw_NF, dw_N, F, h_NH.stride(0), dau_NF.stride(0), dh_NH.stride(0),
                          aw_NF.stride(0), SWIGLU=swiglu, BLOCK_F=block, num_warps=_warps(block))
    return dh_NH, aw_NF, dw_N


def gather_sum(src_ND: torch.Tensor, inv_TK: torch.Tensor | None, weights_TK: torch.Tensor | None,
               out_dtype: torch.dtype, shape_TK: tuple[int, int] | None = None) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * src[inv[t, j]]`` (``inv = -1`` skipped) -> ``[T, D]``.
    ``inv_TK=None`` means ``inv[t, j] = t*K + j`` with ``(T, K) = shape_TK``."""
    T, K = inv_TK.shape if inv_TK is not None else shape_TK
    D = src_ND.shape[1]
    out_TD = torch.empty(T, D, dtype=out_dtype, device=src_ND.device)
    if T == 0:
        return out_TD
    block = _block(D, 2048)
    grid = (T, triton.cdiv(D, block))
    inv = inv_TK if inv_TK is not None else src_ND  # placeholder pointers for switched-off inputs
    w = weights_TK if weights_TK is not None else inv
    _gather_sum_kernel[grid](src_ND, inv, w, out_TD, K, D, src_ND.stride(0), out_TD.stride(0),
                             HAS_W=weights_TK is not None, DIRECT=inv_TK is None, BLOCK_D=block,
                             num_warps=_warps(block))
    return out_TD


def scatter_rows(src_TD: torch.Tensor, inv_TK: torch.Tensor, num_rows: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``out[inv[t, j]] = src[t]`` (cast to ``out_dtype``) -> ``[num_rows, D]``; rows no live
    slot points at stay unwritten."""
    T, K = inv_TK.shape
    D = src_TD.shape[1]
    out_ND = torch.empty(num_rows, D, dtype=out_dtype, device=src_TD.device)
    if T == 0 or num_rows == 0:
        return out_ND
    block = _block(D, 2048)
    while block > 256 and D % block:  # no half-masked last block (D = 7168: 7 x 1024)
        block //= 2
    grid = (T, triton.cdiv(D, block))
    _scatter_rows_kernel[grid](src_TD, inv_TK, out_ND, K, D, src_TD.stride(0), out_ND.stride(0),
                               BLOCK_D=block, num_warps=_warps(block))
    return out_ND
