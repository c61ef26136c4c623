"""The grouped GEMMs with the SwiGLU (forward) and its backward in their epilogues
(:mod:`moekit.experts.triton_gmm_swiglu`) equal the unfused path: ``h`` a per-expert loop and
``a`` the SwiGLU of ``h`` as stored; ``dh``, ``w * a`` and ``<dau, a>`` what the activation
backward gives for the per-expert ``dau``. In Triton's interpreter on CPU (fp32 / fp16: the
interpreter has no bf16 dot) and on the GPU in bf16 against ``torch._grouped_mm`` + the
activation kernels. The layer-level GPU tests (``test_experts_gpu.py``) run both inside the
whole forward and backward (outputs and all gradients against the fp32 reference)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

_CHECK = textwrap.dedent("""
    import torch
    import triton.runtime.interpreter as ti
    # numpy >= 2.3 refuses int() of the interpreter's 1-element scalars (see test_triton_gmm.py)
    _patch = ti._patch_lang_tensor
    def _patched(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    ti._patch_lang_tensor = _patched

    from moekit.experts import steps, triton_gmm as tg, triton_gmm_swiglu as ts

    def rel(x, y):
        return ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()

    g = torch.Generator().manual_seed(0)
    # experts 1 and 4 empty, expert 3 spans more row tiles than a swizzle group; 5 tail rows of
    # -1 slots carry NaN (never read); F = 24 is not a multiple of the 16-wide tile (a tile of
    # the gate half overhangs into the up half's columns unless the halves are kept apart)
    counts = [19, 0, 7, 150, 0, 17]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    E, nv, tail = len(counts), sum(counts), 5
    cases = ((torch.float32, 1e-6, tg.GmmConfig(16, 16, 16, 1, 4)),
             (torch.float16, 2e-3, tg.GmmConfig(16, 16, 16, 2, 4, flatten=True)))
    for dtype, tol, cfg in cases:
        for F, D in ((24, 40), (32, 16)):
            x = torch.randn(nv + tail, D, generator=g).to(dtype); x[nv:] = float("nan")
            w = torch.randn(E, 2 * F, D, generator=g).to(dtype)
            h, a = ts.gmm_gate_up_swiglu(x, w, offs, config=cfg)
            ref, start = [], 0
            for e, end in enumerate(offs.tolist()):
                ref.append(x[start:end].double() @ w[e].double().t())
                start = end
            assert rel(h[:nv], torch.cat(ref)) < tol
            gate, up = h[:nv, :F].double(), h[:nv, F:].double()
            assert rel(a[:nv], gate * torch.sigmoid(gate) * up) < tol
            # backward: dau = dy @ w_out[e], then the activation backward (torch path on CPU)
            n = nv + tail
            dy = torch.randn(n, D, generator=g).to(dtype); dy[nv:] = float("nan")
            w_out = torch.randn(E, D, F, generator=g).to(dtype)
            order, wts = torch.randperm(n, generator=g), torch.rand(n, generator=g)
            dh, aw, dw = ts.gmm_dau_swiglu_backward(dy, w_out, h, wts, order, offs, config=cfg)
            dau, start = [], 0
            for e, end in enumerate(offs.tolist()):
                dau.append(dy[start:end].double() @ w_out[e].double())
                start = end
            dau = torch.cat(dau + [torch.zeros(tail, F, dtype=torch.float64)]).to(dtype)
            want = steps.act_backward(h, dau, wts, order, offs, "swiglu")
            for got_t, want_t in zip((dh, aw, dw), want):
                assert rel(got_t[:nv], want_t[:nv]) < 2 * tol, (F, D, dtype)
    # bad input
    x = torch.randn(8, 16)
    bad = ((ts.gmm_gate_up_swiglu, (x, torch.randn(2, 7, 16), offs[:2])),
           (ts.gmm_gate_up_swiglu, (x, torch.randn(2, 8, 12), offs[:2])),
           (ts.gmm_dau_swiglu_backward, (x, torch.randn(2, 16, 8), torch.randn(8, 12), torch.rand(8),
                                         torch.arange(8), offs[:2])))
    for fn, args in bad:
        try:
            fn(*args)
        except ValueError:
            pass
        else:
            raise AssertionError("no ValueError")
    print("ok")
""")


def test_gate_up_swiglu_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _CHECK], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a Hopper-or-newer GPU")
@pytest.mark.parametrize("T,D,F,E,K,zipf", [(16384, 2048, 768, 128, 8, False), (4096, 2048, 768, 128, 8, True),
                                            (1000, 512, 200, 256, 8, True), (3, 256, 128, 64, 2, False)])
def test_gate_up_swiglu_gpu_equals_unfused(T, D, F, E, K, zipf):
    from moekit.experts import steps, triton_gmm_swiglu
    from moekit.experts.grouped import route_by_expert

    gen = torch.Generator(device="cuda").manual_seed(T + F)
    p = torch.ones(E, device="cuda")
    if zipf:  # skewed: many experts get no rows at all
        p = 1.0 / torch.arange(1, E + 1, device="cuda", dtype=torch.float32) ** 1.2
    idx = torch.multinomial(p.expand(T, E), K, replacement=False, generator=gen)
    idx[:, -1] = torch.where(torch.rand(T, device="cuda", generator=gen) < 0.2, -1, idx[:, -1])
    order, _inv, offs = route_by_expert(idx, E)
    x = torch.randn(order.numel(), D, device="cuda", generator=gen).bfloat16()
    w_in = (torch.randn(E, 2 * F, D, device="cuda", generator=gen) / D ** 0.5).bfloat16()
    n = int(offs[-1])
    h, a = triton_gmm_swiglu.gmm_gate_up_swiglu(x, w_in, offs)
    h_ref = torch._grouped_mm(x, w_in.transpose(-2, -1), offs=offs)
    rel = ((h[:n].double() - h_ref[:n].double()).norm() / h_ref[:n].double().norm()).item()
    assert rel < 1e-3, rel
    a_ref = steps.act_forward(h, offs, "swiglu")  # the activation kernel on the same h
    rel_a = ((a[:n].double() - a_ref[:n].double()).norm() / a_ref[:n].double().norm()).item()
    assert rel_a < 1e-3, rel_a
    # backward: dau GEMM + activation backward kernel, against the fused kernel
    dy = torch.randn(order.numel(), D, device="cuda", generator=gen).bfloat16()
    w_out = (torch.randn(E, D, F, device="cuda", generator=gen) / F ** 0.5).bfloat16()
    wts = torch.rand(idx.numel(), device="cuda", generator=gen)
    got = triton_gmm_swiglu.gmm_dau_swiglu_backward(dy, w_out, h, wts, order, offs)
    dau = torch._grouped_mm(dy, w_out, offs=offs)
    want = steps.act_backward(h, dau, wts, order, offs, "swiglu")
    for name, x_got, x_want in zip(("dh", "aw", "dw"), got, want):
        err = ((x_got[:n].double() - x_want[:n].double()).norm() / x_want[:n].double().norm()).item()
        assert err < 2e-3, (name, err)
