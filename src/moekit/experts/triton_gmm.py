"""Hopper grouped GEMMs in Triton: the two layouts of the expert path, TMA loads, no host sync.

Rows ``0 .. N`` of the activations are sorted by expert; ``offs_E [E]`` (int32, on the device)
holds the cumulative end of each expert's rows, so expert ``e`` owns rows
``offs_E[e-1] .. offs_E[e]`` (``offs_E[-1] = 0``). Rows ``>= offs_E[E-1]`` (``-1`` slots) are
never read or written. Two products, with the semantics of ``torch._grouped_mm``:

- **M-grouped** (:func:`gmm_m_grouped`), ``out_NO[rows_e] = a_NK[rows_e] @ W[e]`` with the weight
  stored either ``[E, O, K]`` (``w_is_ok=True``: ``out = a @ W[e]^T``, nn.Linear-like: the
  forward gate+up and down projections) or ``[E, K, O]`` (``out = a @ W[e]``: the backward
  ``dau`` and ``dx``). ``out_NO``'s rows past ``offs_E[E-1]`` are left unwritten.
- **K-grouped** (:func:`gmm_k_grouped`), the weight gradient ``out_EMO[e] = a_NM[rows_e]^T @
  b_NO[rows_e]`` (``dw_out``, ``dw_in``); an expert without rows gets exact zeros. With
  ``accumulate`` the product is added to an existing ``out_EMO`` in the epilogue (fp32, one
  rounding): two expert calls on the same weights then make one weight gradient with no add
  pass (:mod:`moekit.experts.join`).

The tile schedule lives on the GPU: a persistent grid of one program per multiprocessor walks
the experts in order, reads each one's row range from ``offs_E`` and takes every
``num_programs``-th tile of the running tile count. The activations go through Triton's *ragged*
TMA descriptors (:mod:`triton.tools.ragged_tma`), whose hardware bounds check is one expert's row
range: a tile that overhangs its expert reads zeros and its store is clipped, which is what
keeps the reduction of the K-grouped product, and the rows of other experts, clean without any
masking in the main loop. The weights go through a 3-D descriptor (one expert's matrix per
box), so a partial tile never reads a neighbouring expert's weights.

Accumulation is fp32; bf16 / fp16 operands run on the tensor cores (wgmma), fp32 operands
through an exact (``ieee``) dot, which is correct but slow and meant for tests. The kernels run
in Triton's interpreter too (``TRITON_INTERPRET=1``), which is how they are tested without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from triton.tools.ragged_tma import (
    create_ragged_descriptor,
    load_ragged,
    to_ragged_indices,
)
from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = [
    "DEFAULT_K_CONFIG",
    "DEFAULT_M_CONFIG",
    "FP32_CONFIG",
    "GmmConfig",
    "gmm_k_grouped",
    "gmm_m_grouped",
    "gmm_supported",
]


@dataclasses.dataclass(frozen=True)
class GmmConfig:
    """Tile shape (``block_m x block_n``, reduction step ``block_k``) and launch options.

    ``flatten`` lets Triton pipeline across tile boundaries (the tile and reduction loops as
    one). Triton 3.6's automatic warp specialisation does not apply to these loops on Hopper
    (compiled for sm_90a, the kernels come out the same with or without it), so it is no option."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    num_stages: int = 3
    num_warps: int = 8
    flatten: bool = False
    # Store the tile as two halves of block_n / 2 columns: half the epilogue's shared memory,
    # which leaves room for one more pipeline stage.
    epilogue_subtile: bool = False


# Chosen by bench_gmm.py's five interleaved rounds per configuration on an H100
# (gmm_h100_2026-11-28_s7.json; a single timing per configuration, as in the fifth session's
# sweep, moved by up to 10% with the clock). Three stages with the split epilogue beat four on
# the M-grouped products (Qwen3 dx 1.341 against 1.409 ms, DeepSeek dx 5.74 against 6.09 ms), and
# three flattened stages with a whole-tile epilogue beat four split ones on the K-grouped weight
# gradients (Qwen3 dw_in 1.391 against 1.501 ms). Layer step A/B in one process:
# gmm_defaults_ab_h100_2026-11-28_s7.json.
DEFAULT_M_CONFIG = GmmConfig(128, 256, 64, 3, 8, flatten=True, epilogue_subtile=True)
DEFAULT_K_CONFIG = GmmConfig(128, 256, 64, 3, 8, flatten=True)
# fp32 operands take the exact FMA dot: small tiles (the 16-bit tiles above would need 330-390 KB
# of shared memory in fp32).
FP32_CONFIG = GmmConfig(64, 64, 32, 2, 4)
# Row tiles per swizzle group (tiles that run together share operands in L2).
_GROUP_M = 8

_DOT_PRECISION = {torch.float32: "ieee", torch.bfloat16: "tf32", torch.float16: "tf32"}


@functools.cache
def _num_programs(device_index: int) -> int:
    """One persistent program per multiprocessor (the interpreter's "device" gets a few)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_for(t: torch.Tensor) -> int:
    """Persistent programs for a launch on ``t``'s device: one per multiprocessor, less
    PyTorch's SM carveout where one is set (``torch._C._set_sm_carveout_experimental``, which
    cuBLAS and CUTLASS honour too): a persistent grid takes every SM it is given until the
    GEMM ends, so the carveout is what leaves SMs to kernels queued beside it (the
    expert-parallel overlap's exchanges, :mod:`moekit.parallel.carveout`)."""
    if t.device.type != "cuda":
        return 3
    sms = _num_programs(t.device.index if t.device.index is not None else torch.cuda.current_device())
    get = getattr(torch._C, "_get_sm_carveout_experimental", None)
    return _after_carveout(sms, get() if get is not None else None)


def _after_carveout(sms: int, carveout: int | None) -> int:
    """``sms`` less ``carveout`` (``None``: none), at least one program."""
    return max(1, sms - (carveout or 0))


@triton.jit
def _swizzle(local, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Tile ``local`` of a ``tiles_m x tiles_n`` grid -> ``(pid_m, pid_n)``, in groups of
    ``GROUP_M`` row tiles, so that tiles running together share rows of A and columns of B in L2."""
    per_group = GROUP_M * tiles_n
    first_m = (local // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (local % per_group) % group_m
    pid_n = (local % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _expert_tiles(offs_ptr, num_experts, tiles_n, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """The tile schedule of an M-grouped product: every expert's row range (``starts``,
    ``ends``), row-tile count and one-past-last tile, as ``[E_POW2]`` vectors, and the total
    tile count. A tile finds its expert by one compare-and-sum over these instead of a loop,
    which keeps the persistent tile loop flat (pipelinable)."""
    ex = tl.arange(0, E_POW2)
    live = ex < num_experts
    ends = tl.load(offs_ptr + ex, mask=live, other=0)
    starts = tl.load(offs_ptr + ex - 1, mask=live & (ex > 0), other=0)
    tiles_m_e = tl.cdiv(ends - starts, BLOCK_M)
    last_tile_e = tl.cumsum(tiles_m_e * tiles_n, 0)
    return ex, starts, ends, tiles_m_e, last_tile_e, tl.sum(tiles_m_e * tiles_n, 0)


@triton.jit
def _tile_at(tile, ex, starts, ends, tiles_m_e, last_tile_e, tiles_n, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile ``tile`` of :func:`_expert_tiles`'s schedule -> its expert ``e``, the expert's first
    row and row count, and the tile's row and column offsets within the expert."""
    e = tl.sum((last_tile_e <= tile).to(tl.int32), 0)
    here = ex == e
    start = tl.sum(tl.where(here, starts, 0), 0)
    rows = tl.sum(tl.where(here, ends - starts, 0), 0)
    local = tile - tl.sum(tl.where(ex < e, tiles_m_e * tiles_n, 0), 0)
    pid_m, pid_n = _swizzle(local, tl.cdiv(rows, BLOCK_M), tiles_n, GROUP_M)
    return e, start, rows, pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _m_grouped_kernel(a_desc, w_desc, out_desc, offs_ptr, num_experts, O, K,
                      W_IS_OK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, E_POW2: tl.constexpr, GROUP_M: tl.constexpr,
                      NUM_PROGS: tl.constexpr, FLATTEN: tl.constexpr, SUBTILE: tl.constexpr,
                      PRECISION: tl.constexpr):
    tiles_n = tl.cdiv(O, BLOCK_N)
    steps_k = tl.cdiv(K, BLOCK_K)
    ex, starts, ends, tiles_m_e, last_tile_e, total = _expert_tiles(offs_ptr, num_experts, tiles_n, BLOCK_M, E_POW2)
    for tile in tl.range(tl.program_id(0), total, NUM_PROGS, flatten=FLATTEN):
        e, start, rows, off_m, off_n = _tile_at(tile, ex, starts, ends, tiles_m_e, last_tile_e, tiles_n,
                                                BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ks in range(steps_k):
            off_k = ks * BLOCK_K
            a = load_ragged(a_desc, start, rows, [off_m, off_k])
            if W_IS_OK:
                w = w_desc.load([e, off_n, off_k]).reshape(BLOCK_N, BLOCK_K)
                acc = tl.dot(a, w.T, acc, input_precision=PRECISION)
            else:
                w = w_desc.load([e, off_k, off_n]).reshape(BLOCK_K, BLOCK_N)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
        # store_ragged's index math, spelled out: its reshape trips Triton's interpreter.
        c0, c1, c2 = to_ragged_indices(start, rows, off_m)
        if SUBTILE:
            halves = acc.reshape(BLOCK_M, 2, BLOCK_N // 2).permute(0, 2, 1)
            left, right = halves.split()
            out_desc.store([c0, c1, c2, off_n], left.to(out_desc.dtype).reshape(1, 1, BLOCK_M, BLOCK_N // 2))
            out_desc.store([c0, c1, c2, off_n + BLOCK_N // 2],
                           right.to(out_desc.dtype).reshape(1, 1, BLOCK_M, BLOCK_N // 2))
        else:
            out_desc.store([c0, c1, c2, off_n], acc.to(out_desc.dtype).reshape(1, 1, BLOCK_M, BLOCK_N))


@triton.jit
def _k_grouped_kernel(a_desc, b_desc, out_desc, offs_ptr, num_experts, M, O,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, NUM_PROGS: tl.constexpr, FLATTEN: tl.constexpr,
                      SUBTILE: tl.constexpr, PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(O, BLOCK_N)
    tiles_per_expert = tiles_m * tiles_n
    for tile in tl.range(pid, num_experts * tiles_per_expert, NUM_PROGS, flatten=FLATTEN):
        e = tile // tiles_per_expert
        pid_m, pid_n = _swizzle(tile % tiles_per_expert, tiles_m, tiles_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        rows = tl.load(offs_ptr + e) - start
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ks in range(tl.cdiv(rows, BLOCK_K)):
            off_k = ks * BLOCK_K
            a = load_ragged(a_desc, start, rows, [off_k, off_m])  # [BLOCK_K, BLOCK_M]
            b = load_ragged(b_desc, start, rows, [off_k, off_n])  # [BLOCK_K, BLOCK_N]
            acc = tl.dot(a.T, b, acc, input_precision=PRECISION)
        # ACCUMULATE: the output's tile is read in the epilogue (not before the loop: the
        # accumulator's registers stay free for the pipeline) and added in fp32, so the sum is
        # rounded once.
        if SUBTILE:
            halves = acc.reshape(BLOCK_M, 2, BLOCK_N // 2).permute(0, 2, 1)
            left, right = halves.split()
            if ACCUMULATE:
                left += out_desc.load([e, off_m, off_n]).reshape(BLOCK_M, BLOCK_N // 2).to(tl.float32)
                right += out_desc.load([e, off_m, off_n + BLOCK_N // 2]).reshape(BLOCK_M, BLOCK_N // 2).to(tl.float32)
            out_desc.store([e, off_m, off_n], left.to(out_desc.dtype).reshape(1, BLOCK_M, BLOCK_N // 2))
            out_desc.store([e, off_m, off_n + BLOCK_N // 2], right.to(out_desc.dtype).reshape(1, BLOCK_M, BLOCK_N // 2))
        else:
            if ACCUMULATE:
                acc += out_desc.load([e, off_m, off_n]).reshape(BLOCK_M, BLOCK_N).to(tl.float32)
            out_desc.store([e, off_m, off_n], acc.to(out_desc.dtype).reshape(1, BLOCK_M, BLOCK_N))


def _store_width(c: GmmConfig) -> int:
    return c.block_n // 2 if c.epilogue_subtile else c.block_n


def gmm_supported(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these operands: one dtype of fp32 / bf16 / fp16, 16-byte aligned
    data pointers and row strides (what a TMA descriptor needs)."""
    dtype = tensors[0].dtype
    if dtype not in _DOT_PRECISION or any(t.dtype != dtype for t in tensors):
        return False
    size = tensors[0].element_size()
    for t in tensors:
        if t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]) or t.stride(-1) != 1:
            return False
    return True


def _check_offs(offs_E: torch.Tensor, num_experts: int) -> None:
    if offs_E.dtype != torch.int32 or offs_E.shape != (num_experts,):
        raise ValueError(f"offs_E: expected int32 of shape [{num_experts}], got {offs_E.dtype} "
                         f"{tuple(offs_E.shape)}")


def gmm_m_grouped(a_NK: torch.Tensor, w: torch.Tensor, offs_E: torch.Tensor, *, w_is_ok: bool,
                  config: GmmConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out_NO [N, O]``, rows of expert ``e``: ``a_NK @ w[e]^T`` (``w_is_ok``: ``w`` is
    ``[E, O, K]``) or ``a_NK @ w[e]`` (``w`` is ``[E, K, O]``). Both operands contiguous.
    Rows past ``offs_E[E-1]`` of ``out`` (a new tensor unless given) are left as they are.
    ``config`` defaults to :data:`DEFAULT_M_CONFIG` (:data:`FP32_CONFIG` for fp32)."""
    if a_NK.ndim != 2 or w.ndim != 3:
        raise ValueError(f"a_NK, w: expected 2 and 3 dimensions, got {tuple(a_NK.shape)}, {tuple(w.shape)}")
    E = w.shape[0]
    O, K = (w.shape[1], w.shape[2]) if w_is_ok else (w.shape[2], w.shape[1])
    if a_NK.shape[1] != K:
        raise ValueError(f"a_NK: expected {K} columns to match w {tuple(w.shape)}, got {a_NK.shape[1]}")
    _check_offs(offs_E, E)
    N = a_NK.shape[0]
    if out is not None and (out.shape != (N, O) or out.dtype != a_NK.dtype or not out.is_contiguous()):
        raise ValueError(f"out: expected a contiguous {a_NK.dtype} tensor of shape [{N}, {O}], got "
                         f"{out.dtype} {tuple(out.shape)}")
    out_NO = a_NK.new_empty(N, O) if out is None else out
    if N == 0 or O == 0:
        return out_NO
    if K == 0:
        raise ValueError("a_NK: expected a non-empty reduction (K > 0)")
    c = config or (FP32_CONFIG if a_NK.dtype == torch.float32 else DEFAULT_M_CONFIG)
    a_desc = create_ragged_descriptor(a_NK, [c.block_m, c.block_k])
    out_desc = create_ragged_descriptor(out_NO, [c.block_m, _store_width(c)])
    w_block = [1, c.block_n, c.block_k] if w_is_ok else [1, c.block_k, c.block_n]
    w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), w_block)
    progs = _programs_for(a_NK)
    _m_grouped_kernel[(progs,)](
        a_desc, w_desc, out_desc, offs_E, E, O, K, W_IS_OK=w_is_ok, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        BLOCK_K=c.block_k, E_POW2=max(triton.next_power_of_2(E), 2), GROUP_M=_GROUP_M, NUM_PROGS=progs,
        FLATTEN=c.flatten, SUBTILE=c.epilogue_subtile,
        PRECISION=_DOT_PRECISION[a_NK.dtype], num_stages=c.num_stages, num_warps=c.num_warps)
    return out_NO


def gmm_k_grouped(a_NM: torch.Tensor, b_NO: torch.Tensor, offs_E: torch.Tensor, *,
                  config: GmmConfig | None = None, out: torch.Tensor | None = None,
                  accumulate: bool = False) -> torch.Tensor:
    """``out_EMO [E, M, O]``: ``out[e] = a_NM[rows_e]^T @ b_NO[rows_e]`` (zeros where expert
    ``e`` has no rows). Both operands contiguous, with the same rows. ``out`` (contiguous, the
    operands' dtype): written in place and returned instead of a new tensor. ``accumulate``
    (needs ``out``): ``out[e] += a_NM[rows_e]^T @ b_NO[rows_e]`` instead, the old value added to
    the fp32 accumulator and the sum rounded once (an expert without rows keeps its ``out[e]``):
    the weight gradient of a second set of rows on the same weights, without a separate add.
    ``config`` defaults to :data:`DEFAULT_K_CONFIG` (:data:`FP32_CONFIG` for fp32)."""
    if a_NM.ndim != 2 or b_NO.ndim != 2 or a_NM.shape[0] != b_NO.shape[0]:
        raise ValueError(f"a_NM, b_NO: expected 2-D with equal rows, got {tuple(a_NM.shape)}, {tuple(b_NO.shape)}")
    E = offs_E.shape[0] if offs_E.ndim == 1 else -1
    _check_offs(offs_E, E)
    N, M = a_NM.shape
    O = b_NO.shape[1]
    if accumulate and out is None:
        raise ValueError("out: expected the tensor to accumulate into when accumulate=True, got None")
    if out is not None and (out.shape != (E, M, O) or out.dtype != a_NM.dtype or not out.is_contiguous()):
        raise ValueError(f"out: expected a contiguous {a_NM.dtype} tensor of shape [{E}, {M}, {O}], got "
                         f"{out.dtype} {tuple(out.shape)}")
    out_EMO = a_NM.new_empty(E, M, O) if out is None else out
    if E == 0 or M == 0 or O == 0 or (N == 0 and accumulate):
        return out_EMO
    if N == 0:
        return out_EMO.zero_()
    c = config or (FP32_CONFIG if a_NM.dtype == torch.float32 else DEFAULT_K_CONFIG)
    a_desc = create_ragged_descriptor(a_NM, [c.block_k, c.block_m])
    b_desc = create_ragged_descriptor(b_NO, [c.block_k, c.block_n])
    out_desc = TensorDescriptor(out_EMO, list(out_EMO.shape), list(out_EMO.stride()), [1, c.block_m, _store_width(c)])
    progs = _programs_for(a_NM)
    _k_grouped_kernel[(progs,)](
        a_desc, b_desc, out_desc, offs_E, E, M, O, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        GROUP_M=_GROUP_M, NUM_PROGS=progs, FLATTEN=c.flatten, SUBTILE=c.epilogue_subtile, PRECISION=_DOT_PRECISION[a_NM.dtype],
        ACCUMULATE=bool(accumulate), num_stages=c.num_stages, num_warps=c.num_warps)
    return out_EMO
