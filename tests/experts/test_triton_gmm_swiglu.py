"""The gate+up grouped GEMM with the SwiGLU in its epilogue
(:mod:`moekit.experts.triton_gmm_swiglu`) equals the unfused path: ``h`` a per-expert loop and
``a`` the SwiGLU of ``h`` as stored, in Triton's interpreter on CPU (fp32 / fp16: the
interpreter has no bf16 dot) and on the GPU in bf16 against ``torch._grouped_mm`` + the
activation kernel; and the whole layer (outputs and all gradients) with the fusion forced on
equals the layer without it."""

import textwrap

import pytest
import torch

# Run by the run_interpreted fixture (conftest.py: TRITON_INTERPRET=1 in a fresh process).
_CHECK = textwrap.dedent("""
    import torch

    from moekit.experts import triton_gmm as tg, triton_gmm_swiglu as ts

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
    # bad input
    x = torch.randn(8, 16)
    for args in ((x, torch.randn(2, 7, 16), offs[:2]), (x, torch.randn(2, 8, 12), offs[:2])):
        try:
            ts.gmm_gate_up_swiglu(*args)
        except ValueError:
            pass
        else:
            raise AssertionError("no ValueError")
    print("ok")
""")


def test_gate_up_swiglu_in_interpreter(run_interpreted):
    run_interpreted(_CHECK)


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a Hopper-or-newer GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,D,F,E,K", [(512, 256, 128, 64, 8), (1, 256, 128, 64, 8), (100, 128, 64, 16, 1),
                                       (64, 4096, 200, 8, 2)])
def test_layer_with_fused_forward_equals_unfused(T, D, F, E, K, dtype, monkeypatch):
    from moekit.experts import grouped

    gen = torch.Generator(device="cuda").manual_seed(T + D)
    idx = torch.rand(T, E, device="cuda", generator=gen).topk(K, dim=1).indices
    idx[0, 0] = -1
    x = torch.randn(T, D, device="cuda", generator=gen).to(dtype)
    w = torch.rand(T, K, device="cuda", generator=gen)
    w_in = (torch.randn(E, 2 * F, D, device="cuda", generator=gen) / D ** 0.5).to(dtype)
    w_out = (torch.randn(E, D, F, device="cuda", generator=gen) / F ** 0.5).to(dtype)
    dy = torch.randn(T, D, device="cuda", generator=gen).to(dtype)

    def run(min_dim):
        monkeypatch.setattr(grouped, "FUSED_SWIGLU_MIN_DIM", min_dim)
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, w_in, w_out)]
        y = grouped.experts_grouped_mm(leaves[0], idx, leaves[1], leaves[2], leaves[3], "swiglu")
        return (y, *torch.autograd.grad(y, leaves, dy))

    fused, unfused = run(0), run(10 ** 9)
    for name, a, b in zip(("y", "dx", "dw", "dw_in", "dw_out"), fused, unfused):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-5, msg=name)
