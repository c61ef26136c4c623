"""The counting sort of :mod:`moekit.experts.triton_route` equals the stable ``torch.sort``
definition (:func:`moekit.experts.grouped.route_by_sort`) exactly: in Triton's interpreter on
CPU (with small blocks, so that runs of one expert cross block boundaries) and on the GPU at the
benchmark's sizes."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

_CHECK = textwrap.dedent("""
    import torch
    from hypothesis import given, settings, strategies as st
    from moekit.experts import triton_route as tr
    from moekit.experts.grouped import route_by_sort

    tr._MAX_BLOCK = 32  # several blocks per case; the GPU test runs the real block size

    def check(T, K, E, p_empty, seed):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, E, (T, K), generator=g)
        idx[torch.rand(T, K, generator=g) < p_empty] = -1
        got, want = tr.route_slots(idx, E), route_by_sort(idx, E)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (T, K, E, p_empty, a, b)

    # T=1; one expert; every slot -1; E > N (most experts empty); N not a multiple of the
    # block; an empty batch; k = E
    for case in ((1, 1, 4, 0.0), (40, 2, 1, 0.3), (9, 4, 8, 1.0), (5, 3, 300, 0.0),
                 (77, 8, 64, 0.1), (0, 4, 8, 0.0), (33, 6, 6, 0.0)):
        check(*case, seed=0)

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(st.integers(1, 40), st.integers(1, 8), st.integers(1, 70), st.sampled_from([0.0, 0.2, 0.9]),
           st.integers(0, 2**16))
    def prop(T, K, E, p_empty, seed):
        check(T, K, E, p_empty, seed)

    prop()
    print("ok")
""")


def test_route_slots_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _CHECK], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T,K,E,p_empty", [(16384, 8, 128, 0.0), (16384, 8, 64, 0.3), (8192, 8, 256, 0.0),
                                           (4096, 2, 8, 0.0), (1, 8, 256, 0.0), (3000, 4, 32, 1.0)])
def test_route_by_expert_gpu_equals_sort(T, K, E, p_empty):
    from moekit.experts.grouped import route_by_expert, route_by_sort

    g = torch.Generator(device="cuda").manual_seed(T + E)
    idx = torch.randint(0, E, (T, K), device="cuda", generator=g)
    idx[torch.rand(T, K, device="cuda", generator=g) < p_empty] = -1
    got, want = route_by_expert(idx, E), route_by_sort(idx, E)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
