"""Every Triton GEMM kernel of the expert path, in its default configuration, fits the shared
memory of an H100 (232448 bytes per block with the opt-in carveout). The kernels are compiled
for sm_90a here, on the CPU, with Triton's bundled ``ptxas``: a configuration that needs more
(a fourth pipeline stage of the fused SwiGLU forward needs 262176 bytes) fails on the GPU at its
first launch, which this catches without one."""

import inspect

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type
from triton.tools.ragged_tma import create_ragged_descriptor
from triton.tools.tensor_descriptor import TensorDescriptor

from moekit.experts import triton_gmm as tg
from moekit.experts import triton_gmm_swiglu as ts

H100_SMEM = 232448
BF16 = torch.bfloat16


def _smem(kernel, args: dict, consts: dict, cfg: tg.GmmConfig) -> int:
    """Shared memory (bytes) of ``kernel`` compiled for sm_90a with these arguments."""
    params = list(inspect.signature(kernel.fn).parameters)
    sig = {p: "constexpr" if p in consts else mangle_type(args[p]) for p in params}
    src = ASTSource(kernel, sig, {(params.index(k),): v for k, v in consts.items()})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    except Exception as e:  # no CUDA backend / ptxas in this Triton build
        pytest.skip(f"cannot compile for sm_90a here: {e!r}")
    return compiled.metadata.shared


_ragged = create_ragged_descriptor


def _desc(t, block):
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def _common(c: tg.GmmConfig) -> dict:
    return dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=8, NUM_PROGS=132,
                FLATTEN=c.flatten, PRECISION="tf32")


N, D, F, E = 4096, 2048, 768, 8
OFFS = torch.empty(E, dtype=torch.int32)


def _m_grouped(c, w_is_ok):
    a, o = torch.empty(N, D, dtype=BF16), torch.empty(N, 2 * F, dtype=BF16)
    w = torch.empty(E, *((2 * F, D) if w_is_ok else (D, 2 * F)), dtype=BF16)
    width = c.block_n // 2 if c.epilogue_subtile else c.block_n
    args = dict(a_desc=_ragged(a, [c.block_m, c.block_k]),
                w_desc=_desc(w, [1, c.block_n, c.block_k] if w_is_ok else [1, c.block_k, c.block_n]),
                out_desc=_ragged(o, [c.block_m, width]), offs_ptr=OFFS, num_experts=E, O=2 * F, K=D)
    consts = _common(c) | dict(W_IS_OK=w_is_ok, E_POW2=8, SUBTILE=c.epilogue_subtile)
    return _smem(tg._m_grouped_kernel, args, consts, c)


def _k_grouped(c, accumulate):
    a, b, o = torch.empty(N, D, dtype=BF16), torch.empty(N, 2 * F, dtype=BF16), torch.empty(E, D, 2 * F, dtype=BF16)
    width = c.block_n // 2 if c.epilogue_subtile else c.block_n
    args = dict(a_desc=_ragged(a, [c.block_k, c.block_m]), b_desc=_ragged(b, [c.block_k, c.block_n]),
                out_desc=_desc(o, [1, c.block_m, width]), offs_ptr=OFFS, num_experts=E, M=D, O=2 * F)
    consts = _common(c) | dict(SUBTILE=c.epilogue_subtile, ACCUMULATE=accumulate)
    return _smem(tg._k_grouped_kernel, args, consts, c)


def _swiglu_fwd(c):
    x, a = torch.empty(N, D, dtype=BF16), torch.empty(N, F, dtype=BF16)
    h, w = torch.empty(N, 2, F, dtype=BF16), torch.empty(E, 2, F, D, dtype=BF16)
    args = dict(x_desc=_ragged(x, [c.block_m, c.block_k]), w_desc=_desc(w, [1, 2, c.block_n, c.block_k]),
                h_desc=_ragged(h, [c.block_m, 1, c.block_n]), a_desc=_ragged(a, [c.block_m, c.block_n]),
                offs_ptr=OFFS, num_experts=E, F=F, K=D)
    return _smem(ts._gate_up_swiglu_kernel, args, _common(c) | dict(E_POW2=8), c)


@pytest.mark.parametrize("kernel", ["m_grouped_ok", "m_grouped_ko", "k_grouped", "k_grouped_accumulate",
                                    "swiglu_fwd"])
def test_default_configs_fit_h100_shared_memory(kernel):
    smem = {
        "m_grouped_ok": lambda: _m_grouped(tg.DEFAULT_M_CONFIG, True),
        "m_grouped_ko": lambda: _m_grouped(tg.DEFAULT_M_CONFIG, False),
        "k_grouped": lambda: _k_grouped(tg.DEFAULT_K_CONFIG, False),
        "k_grouped_accumulate": lambda: _k_grouped(tg.DEFAULT_K_CONFIG, True),
        "swiglu_fwd": lambda: _swiglu_fwd(ts.DEFAULT_SWIGLU_CONFIG),
    }[kernel]()
    assert 0 < smem <= H100_SMEM, smem


def test_the_check_rejects_a_config_that_does_not_fit():
    # the fused forward with a fourth stage: 262176 bytes, measured as OutOfResources on an H100
    assert _swiglu_fwd(tg.GmmConfig(128, 128, 64, 4, 8, flatten=True)) > H100_SMEM
