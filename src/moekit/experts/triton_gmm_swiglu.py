"""The gate+up grouped GEMM with the SwiGLU in its epilogue (Hopper, Triton, TMA).

The forward of the grouped expert path is ``h = x @ W_in[e]^T`` (``[N, 2F]``, gate columns
then up columns), then ``a = silu(gate) * up`` (``[N, F]``) in a separate kernel that reads
all of ``h`` back. Here one program computes a gate tile and the matching up tile over the
same rows of ``x`` (one ``[BLOCK_M, 2 * BLOCK_N]`` fp32 accumulator fed by a weight box that
spans both halves), stores both into ``h`` (the backward needs them) and writes ``a`` from the
same registers: ``h`` is never read back, which saves the activation kernel's pass over
``[N, 2F]`` and its launch. ``a`` is computed from the gate and up values *as stored* (rounded
to the output dtype), so it equals what :func:`moekit.experts.steps.act_forward` gives on this
``h`` (bit-identical layer outputs and gradients on an H100, ``benchmarks/ab_layer.py``).

Everything else is :mod:`moekit.experts.triton_gmm`'s M-grouped kernel: a persistent grid
walking the experts' row ranges from ``offs_E`` on the GPU (no host sync), activations through
ragged TMA descriptors (an expert's rows only; ``-1`` rows past ``offs_E[E-1]`` are neither read
nor written). The weight ``[E, 2F, D]`` is read as ``[E, 2, F, D]`` and ``h`` written as
``[N, 2, F]``, so a tile's columns never cross from the gate half into the up half, whatever
``F`` is.

The same fusion of the activation *backward* into the ``dau`` GEMM's epilogue (load the
matching ``h`` tiles, write ``dh``, ``w * a`` and per-row shares of ``<dau, a>``) was built and
measured at commit c3fb3a3: its epilogue needs 128 x 128 tiles (255 registers and spills
even so), and the layer's forward+backward got 2.5-6% slower on every shape, so it was dropped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.ragged_tma import (
    create_ragged_descriptor,
    load_ragged,
    to_ragged_indices,
)
from triton.tools.tensor_descriptor import TensorDescriptor

from moekit.experts.triton_gmm import (
    _DOT_PRECISION,
    _GROUP_M,
    FP32_CONFIG,
    GmmConfig,
    _check_offs,
    _expert_tiles,
    _programs_for,
    _tile_at,
    gmm_supported,
)

__all__ = ["DEFAULT_SWIGLU_CONFIG", "gate_up_swiglu_supported", "gmm_gate_up_swiglu"]

# block_n is the width of each of the two tiles (gate and up): 2 x 128 columns, the register
# and shared-memory footprint of triton_gmm's 128 x 256 tile.
DEFAULT_SWIGLU_CONFIG = GmmConfig(128, 128, 64, 3, 8, flatten=True)


@triton.jit
def _gate_up_swiglu_kernel(x_desc, w_desc, h_desc, a_desc, offs_ptr, num_experts, F, K,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           E_POW2: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGS: tl.constexpr,
                           FLATTEN: tl.constexpr, PRECISION: tl.constexpr):
    tiles_n = tl.cdiv(F, BLOCK_N)
    steps_k = tl.cdiv(K, BLOCK_K)
    ex, starts, ends, tiles_m_e, last_tile_e, total = _expert_tiles(offs_ptr, num_experts, tiles_n, BLOCK_M, E_POW2)
    for tile in tl.range(tl.program_id(0), total, NUM_PROGS, flatten=FLATTEN):
        e, start, rows, off_m, off_n = _tile_at(tile, ex, starts, ends, tiles_m_e, last_tile_e, tiles_n,
                                                BLOCK_M, BLOCK_N, GROUP_M)
        # one accumulator over the gate and the up tile (a [2 * BLOCK_N, BLOCK_K] weight box):
        # two dots into two accumulators serialise Hopper's asynchronous wgmma
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for ks in range(steps_k):
            off_k = ks * BLOCK_K
            x = load_ragged(x_desc, start, rows, [off_m, off_k])
            w = w_desc.load([e, 0, off_n, off_k]).reshape(2 * BLOCK_N, BLOCK_K)
            acc = tl.dot(x, w.T, acc, input_precision=PRECISION)
        g, u = acc.to(h_desc.dtype).reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1).split()
        c0, c1, c2 = to_ragged_indices(start, rows, off_m)
        h_desc.store([c0, c1, c2, 0, off_n], g.reshape(1, 1, BLOCK_M, 1, BLOCK_N))
        h_desc.store([c0, c1, c2, 1, off_n], u.reshape(1, 1, BLOCK_M, 1, BLOCK_N))
        g32 = g.to(tl.float32)
        act = g32 * tl.sigmoid(g32) * u.to(tl.float32)
        a_desc.store([c0, c1, c2, off_n], act.to(a_desc.dtype).reshape(1, 1, BLOCK_M, BLOCK_N))


def gate_up_swiglu_supported(x_ND: torch.Tensor, w_in_EHD: torch.Tensor) -> bool:
    """Whether :func:`gmm_gate_up_swiglu` takes these operands: what the TMA descriptors need
    (:func:`~moekit.experts.triton_gmm.gmm_supported`, contiguous), an even ``H = 2F`` and ``F``
    a whole number of 16-byte units (the halves' row stride)."""
    if w_in_EHD.ndim != 3 or w_in_EHD.shape[1] % 2 or not (x_ND.is_contiguous() and w_in_EHD.is_contiguous()):
        return False
    F = w_in_EHD.shape[1] // 2
    return F * x_ND.element_size() % 16 == 0 and gmm_supported(x_ND, w_in_EHD)


def gmm_gate_up_swiglu(x_ND: torch.Tensor, w_in_EHD: torch.Tensor, offs_E: torch.Tensor, *,
                       config: GmmConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_ND [N, D]`` (rows sorted by expert), ``w_in_EHD [E, 2F, D]`` (gate rows, then up
    rows), ``offs_E [E]`` int32 -> ``h_NH [N, 2F]`` (``x @ w_in[e]^T`` per expert's rows) and
    ``a_NF [N, F]`` (``silu(h[:, :F]) * h[:, F:]``, from ``h`` as stored). Rows past
    ``offs_E[E-1]`` of both are left unwritten. ``config.block_n`` is the width of each of the
    two tiles; defaults to :data:`DEFAULT_SWIGLU_CONFIG` (:data:`~moekit.experts.triton_gmm.FP32_CONFIG`
    for fp32)."""
    if x_ND.ndim != 2 or w_in_EHD.ndim != 3 or w_in_EHD.shape[2] != x_ND.shape[1] or w_in_EHD.shape[1] % 2:
        raise ValueError(f"x_ND, w_in_EHD: expected [N, D] and [E, 2F, D], got {tuple(x_ND.shape)}, "
                         f"{tuple(w_in_EHD.shape)}")
    if not gate_up_swiglu_supported(x_ND, w_in_EHD):
        raise ValueError("x_ND, w_in_EHD: expected contiguous fp32 / bf16 / fp16 operands of one dtype with "
                         "16-byte aligned rows and gate / up halves")
    E, H, D = w_in_EHD.shape
    F = H // 2
    _check_offs(offs_E, E)
    N = x_ND.shape[0]
    h_NH = x_ND.new_empty(N, H)
    a_NF = x_ND.new_empty(N, F)
    if N == 0 or F == 0:
        return h_NH, a_NF
    if D == 0:
        raise ValueError("x_ND: expected a non-empty reduction (D > 0)")
    c = config or (FP32_CONFIG if x_ND.dtype == torch.float32 else DEFAULT_SWIGLU_CONFIG)
    x_desc = create_ragged_descriptor(x_ND, [c.block_m, c.block_k])
    h_desc = create_ragged_descriptor(h_NH.view(N, 2, F), [c.block_m, 1, c.block_n])
    a_desc = create_ragged_descriptor(a_NF, [c.block_m, c.block_n])
    w4 = w_in_EHD.view(E, 2, F, D)
    w_desc = TensorDescriptor(w4, list(w4.shape), list(w4.stride()), [1, 2, c.block_n, c.block_k])
    progs = _programs_for(x_ND)
    _gate_up_swiglu_kernel[(progs,)](
        x_desc, w_desc, h_desc, a_desc, offs_E, E, F, D, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        BLOCK_K=c.block_k, E_POW2=max(triton.next_power_of_2(E), 2), GROUP_M=_GROUP_M, NUM_PROGS=progs,
        FLATTEN=c.flatten, PRECISION=_DOT_PRECISION[x_ND.dtype], num_stages=c.num_stages,
        num_warps=c.num_warps)
    return h_NH, a_NF

