"""Experimental: the gate+up grouped GEMM with the token gather and the activation fused in
(ScatterMoE style), in Triton. Not on the default path: ``benchmarks/bench_layer.py
--probe-fused`` times it against ``index_select`` + ``torch._grouped_mm`` + the activation
kernel, and it is wired in only where that measures faster.

One program computes a ``[BLOCK_M, BLOCK_N]`` tile of one expert: it finds its expert and row
block from ``offs_E`` (no host sync, no tile list), loads the ``BLOCK_M`` token rows of ``x``
straight from their token index (``order // K``, no gathered copy of ``x``), multiplies by the
gate and the up rows of ``w_in[e]`` with fp32 accumulation, and writes both ``h`` (saved for
the backward) and ``a = act(h)``. Programs run n-fastest so that consecutive programs share
their ``x`` rows in L2, and an expert's weights stay in L2 across its row blocks.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["gather_gate_up"]

_SQRT1_2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _gather_gate_up_kernel(x_ptr, order_ptr, offs_ptr, w_ptr, h_ptr, a_ptr, xs_ptr,
                           K: tl.constexpr, D: tl.constexpr, F: tl.constexpr, E: tl.constexpr,
                           SWIGLU: tl.constexpr, STORE_X: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    H: tl.constexpr = 2 * F if SWIGLU else F
    num_n: tl.constexpr = (F + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    pid_m = pid // num_n
    pid_n = pid % num_n
    # Which expert and row block is tile pid_m? Walk the experts' block counts.
    seen = 0
    my_e = -1
    row0 = 0
    row_end = 0
    start = 0
    for e in range(0, E):
        end = tl.load(offs_ptr + e)
        nb = (end - start + BLOCK_M - 1) // BLOCK_M
        hit = (pid_m >= seen) & (pid_m < seen + nb)
        my_e = tl.where(hit, e, my_e)
        row0 = tl.where(hit, start + (pid_m - seen) * BLOCK_M, row0)
        row_end = tl.where(hit, end, row_end)
        seen += nb
        start = end
    if my_e >= 0:
        rows = row0 + tl.arange(0, BLOCK_M)
        in_m = rows < row_end
        tok = tl.load(order_ptr + rows, mask=in_m, other=0) // K
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = cols < F
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tok.to(tl.int64)[:, None] * D + ks[None, :]
        w_e = w_ptr + my_e.to(tl.int64) * H * D
        g_ptrs = w_e + cols[None, :] * D + ks[:, None]  # [BLOCK_K, BLOCK_N] view of w_in[e, cols, k]
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            in_k = (k0 + ks) < D
            xa = tl.load(a_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
            if STORE_X:  # the first column block also writes the gathered rows (for the backward)
                if pid_n == 0:
                    tl.store(xs_ptr + rows.to(tl.int64)[:, None] * D + (k0 + ks)[None, :], xa,
                             mask=in_m[:, None] & in_k[None, :])
            wg = tl.load(g_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
            acc_g = tl.dot(xa, wg, acc_g)
            if SWIGLU:
                wu = tl.load(g_ptrs + F * D, mask=in_k[:, None] & in_n[None, :], other=0.0)
                acc_u = tl.dot(xa, wu, acc_u)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
        out_mask = in_m[:, None] & in_n[None, :]
        r64 = rows.to(tl.int64)[:, None]
        g = acc_g.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + r64 * H + cols[None, :], g, mask=out_mask)
        g = g.to(tl.float32)  # the activation of the rounded h, as the backward recomputes it
        if SWIGLU:
            u = acc_u.to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + r64 * H + F + cols[None, :], u, mask=out_mask)
            act = g * tl.sigmoid(g) * u.to(tl.float32)
        else:
            act = 0.5 * g * (1.0 + tl.erf(g * _SQRT1_2))
        tl.store(a_ptr + r64 * F + cols[None, :], act.to(a_ptr.dtype.element_ty), mask=out_mask)


def _configs():
    shapes = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 8, 4),
              (64, 64, 64, 4, 4), (128, 256, 64, 8, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


_TUNED = None if os.environ.get("TRITON_INTERPRET") == "1" else \
    triton.autotune(_configs(), key=["D", "F", "E", "K", "SWIGLU", "STORE_X"])(_gather_gate_up_kernel)


def gather_gate_up(x_TD: torch.Tensor, order_N: torch.Tensor, offs_E: torch.Tensor, w_in_EHD: torch.Tensor,
                   K: int, activation: str, store_x: bool):
    """``h_NH [N, H]`` (rows in expert order), ``a_NF = act(h)`` ``[N, F]`` and, with
    ``store_x``, the gathered rows ``x_ND [N, D]`` (else None), from unsorted ``x_TD`` and the
    routing metadata of :func:`moekit.experts.grouped.route_by_expert`. Rows past
    ``offs_E[-1]`` are left unwritten, as ``torch._grouped_mm`` leaves them."""
    swiglu = activation == "swiglu"
    E, H, D = w_in_EHD.shape
    F = H // 2 if swiglu else H
    N = order_N.shape[0]
    h_NH = torch.empty(N, H, dtype=x_TD.dtype, device=x_TD.device)
    a_NF = torch.empty(N, F, dtype=x_TD.dtype, device=x_TD.device)
    xs = torch.empty(N, D, dtype=x_TD.dtype, device=x_TD.device) if store_x else h_NH  # h: unused placeholder
    if _TUNED is not None and N * H * D >= 2 ** 32:  # autotune only where it pays (prefill sizes)
        grid = lambda m: ((triton.cdiv(N, m["BLOCK_M"]) + E) * triton.cdiv(F, m["BLOCK_N"]),)  # noqa: E731
        _TUNED[grid](x_TD, order_N, offs_E, w_in_EHD, h_NH, a_NF, xs, K=K, D=D, F=F, E=E, SWIGLU=swiglu,
                     STORE_X=store_x)
    else:  # small problems (and Triton's interpreter): one fixed tile shape
        bm, bn, bk, warps = (16, 16, 16, 1) if _TUNED is None else (64, 64, 64, 4)
        grid = ((triton.cdiv(N, bm) + E) * triton.cdiv(F, bn),)
        _gather_gate_up_kernel[grid](x_TD, order_N, offs_E, w_in_EHD, h_NH, a_NF, xs, K=K, D=D, F=F, E=E,
                                     SWIGLU=swiglu, STORE_X=store_x, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                     num_warps=warps)
    return h_NH, a_NF, (xs if store_x else None)
