"""The grouped-GEMM expert path on CUDA equals the fp32 reference: outputs and all gradients,
uniform and Zipf routing, zero-token experts, T=1, E=256, k=1, k=8, k=E, -1 slots, bf16 /
fp16 / fp32, under autocast and torch.compile(fullgraph=True).

Tolerances are relative Frobenius errors ``|got - ref| / |ref|`` against ``experts_sorted``
run in fp32 (TF32 off) on the same, upcast, inputs. The low-precision path rounds the gate+up
output, the activation and the expert output to the working dtype once each (the GEMMs
accumulate in fp32), so the error is a few units of that dtype's rounding (2^-8 for bf16,
2^-11 for fp16): the bounds below are about 3x the errors seen on an H100.
"""

import pytest
import torch

import moekit
from moekit.experts import ExpertsConfig, GroupedExperts, experts_sorted
from moekit.experts.backends import get_backend
from moekit.experts.grouped import experts_grouped_mm

pytestmark = pytest.mark.gpu

# dtype -> (output bound, gradient bound), relative Frobenius error vs the fp32 reference
TOL = {torch.bfloat16: (1.5e-2, 2.5e-2), torch.float16: (3e-3, 5e-3), torch.float32: (1e-5, 1e-4)}

# name, T, D, F, E, K, routing, share of -1 slots, dead experts
CASES = [
    ("uniform", 256, 256, 128, 8, 2, "uniform", 0.0, ()),
    ("zipf", 512, 256, 128, 64, 8, "zipf", 0.0, ()),
    ("E256_k8", 128, 128, 64, 256, 8, "uniform", 0.0, ()),
    ("T1_k8", 1, 256, 128, 64, 8, "uniform", 0.0, ()),
    ("k1_dead", 64, 128, 64, 16, 1, "uniform", 0.0, (0, 3, 15)),
    ("minus_one", 100, 128, 64, 16, 4, "zipf", 0.3, (5,)),
    ("k_eq_E", 32, 64, 32, 4, 4, "uniform", 0.0, ()),
]


def _routing(T, E, K, kind, dead, gen):
    """``[T, K]`` distinct experts per token: uniform, or Zipf(1.2) over a random expert order."""
    if kind == "zipf":
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        p = p[torch.randperm(E, generator=gen)]
    else:
        p = torch.ones(E, dtype=torch.float64)
    p[list(dead)] = 0.0
    return torch.multinomial(p.expand(T, E), K, replacement=False, generator=gen)


def _inputs(T, D, F, E, K, routing, minus_one, dead, activation, seed=0):
    gen = torch.Generator().manual_seed(seed)
    H = 2 * F if activation == "swiglu" else F
    idx = _routing(T, E, K, routing, dead, gen)
    if minus_one:
        idx = idx.masked_fill(torch.rand(idx.shape, generator=gen) < minus_one, -1)
    w = torch.rand(T, K, generator=gen).masked_fill(idx < 0, 0.0)
    x = torch.randn(T, D, generator=gen)
    w_in = torch.randn(E, H, D, generator=gen) / D ** 0.5
    w_out = torch.randn(E, D, F, generator=gen) / F ** 0.5
    return [t.cuda() for t in (x, idx, w, w_in, w_out)]


def _run(fn, args, activation, dy):
    leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    y = fn(*leaves, activation)
    grads = torch.autograd.grad(y, [leaves[i] for i in (0, 2, 3, 4)], dy.to(y.dtype))
    return y, grads


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_grouped_matches_fp32_reference(case, dtype, activation):
    name, T, D, F, E, K, routing, minus_one, dead = case
    args = _inputs(T, D, F, E, K, routing, minus_one, dead, activation)
    dy = torch.randn(T, D, device="cuda")
    y_ref, g_ref = _run(experts_sorted, args, activation, dy)
    # Routing weights stay fp32 (fp32 router); activations and expert weights in `dtype`.
    low = [a.to(dtype) if a.is_floating_point() and i != 2 else a for i, a in enumerate(args)]
    y, g = _run(experts_grouped_mm, low, activation, dy)
    tol_y, tol_g = TOL[dtype]
    errs = {"y": _rel(y, y_ref)} | {n: _rel(a, b) for n, a, b in zip(("dx", "dw", "dw_in", "dw_out"), g, g_ref)}
    print(f"{name} {dtype} {activation} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert errs["y"] < tol_y, errs
    for n in ("dx", "dw", "dw_in", "dw_out"):
        assert errs[n] < tol_g, (n, errs)
    counts = torch.bincount(args[1][args[1] >= 0], minlength=E)
    idle = counts == 0
    # Experts without tokens get exactly zero weight gradients; -1 slots zero weight gradient.
    assert torch.all(g[2][idle] == 0) and torch.all(g[3][idle] == 0)
    assert torch.all(g[1][args[1] < 0] == 0)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,E,K,minus_one", [(1, 64, 8, 0.0), (1, 256, 8, 0.0), (2, 16, 4, 0.3), (1, 8, 1, 0.0)])
def test_decode_path_matches_fp32_reference(T, E, K, minus_one, dtype, activation):
    args = _inputs(T, 512, 256, E, K, "zipf", minus_one, (), activation, seed=T + E)
    y_ref = experts_sorted(*args, activation)
    low = [a.to(dtype) if a.is_floating_point() and i != 2 else a for i, a in enumerate(args)]
    with torch.no_grad():  # inference with <= DECODE_MAX_SLOTS slots: the per-slot kernels
        y = experts_grouped_mm(*low, activation)
    err = _rel(y, y_ref)
    print(f"decode T={T} E={E} K={K} {dtype} {activation} y={err:.2e}")
    assert y.dtype == dtype and err < TOL[dtype][0]


def test_decode_path_compiles_fullgraph():
    args = _inputs(2, 512, 256, 16, 4, "uniform", 0.3, (), "swiglu")
    low = [a.bfloat16() if a.is_floating_point() and i != 2 else a for i, a in enumerate(args)]
    torch._dynamo.reset()
    with torch.no_grad():
        y = experts_grouped_mm(*low, "swiglu")  # eager: the kernels called directly
        y_op = torch.ops.moekit.experts_decode(*low, "swiglu")  # what a traced graph holds
        y_compiled = torch.compile(experts_grouped_mm, fullgraph=True)(*low, "swiglu")
    assert torch.equal(y_op, y)
    assert _rel(y_compiled, y) < 1e-6


def test_compile_fullgraph_equals_eager():
    args = _inputs(300, 256, 128, 32, 4, "zipf", 0.1, (2,), "swiglu")
    args = [a.bfloat16() if a.is_floating_point() and i != 2 else a for i, a in enumerate(args)]
    dy = torch.randn(300, 256, device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(experts_grouped_mm, fullgraph=True)
    y, g = _run(experts_grouped_mm, args, "swiglu", dy)
    y_c, g_c = _run(compiled, args, "swiglu", dy)
    assert _rel(y_c, y) < 1e-6
    for a, b in zip(g_c, g):
        assert _rel(a, b) < 1e-6


def test_forward_and_backward_never_sync_with_the_host():
    args = _inputs(512, 256, 128, 64, 8, "zipf", 0.1, (), "swiglu")
    x, idx, w, w_in, w_out = [a.bfloat16().requires_grad_() if a.is_floating_point() else a for a in args]
    experts_grouped_mm(x, idx, w, w_in, w_out, "swiglu")  # warm-up: Triton compiles outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = experts_grouped_mm(x, idx, w, w_in, w_out, "swiglu")
        torch.autograd.grad(y, [x, w, w_in, w_out], torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_autocast_module_with_fp32_parameters():
    torch.manual_seed(0)
    mod = GroupedExperts(ExpertsConfig(dim=256, ffn_dim=128, num_experts=16)).cuda()
    x = torch.randn(200, 256, device="cuda", requires_grad=True)
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(200)]).cuda()
    w = torch.rand(200, 4, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = mod(x, idx, w)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    ref = experts_sorted(x.detach(), idx, w, mod.w_in.detach(), mod.w_out.detach(), "swiglu")
    assert _rel(y, ref) < TOL[torch.bfloat16][0]
    assert mod.w_in.grad.dtype == torch.float32 and torch.isfinite(mod.w_in.grad).all()
    assert x.grad.abs().sum() > 0


def test_layer_picks_grouped_path_on_cuda_and_matches_sorted():
    assert get_backend("auto", torch.device("cuda")) is experts_grouped_mm
    torch.manual_seed(0)
    cfg = moekit.MoEConfig(dim=256, ffn_dim=128, num_experts=16, top_k=4, balance="micro")
    layer = moekit.MoE(cfg).cuda().bfloat16()
    ref_layer = moekit.MoE(cfg.__class__(**{**cfg.__dict__, "backend": "sorted"})).cuda().bfloat16()
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    out, ref = layer(x), ref_layer(x)
    assert _rel(out.hidden, ref.hidden) < TOL[torch.bfloat16][0]
    (out.hidden.float().sum() + out.aux_loss).backward()
    assert torch.isfinite(layer.experts.w_in.grad).all()


@pytest.mark.parametrize("src_dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                 (torch.float32, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("T,D,K,E,minus_one", [(300, 7168, 8, 32, 0.0), (257, 2048, 8, 128, 0.2), (5, 96, 1, 4, 0.0)])
def test_permute_rows_kernel_equals_index_select(src_dtype, out_dtype, T, D, K, E, minus_one):
    """The Triton scatter that puts token rows into expert order writes exactly
    ``src.to(out).index_select(0, order // K)`` on every live row (the cast rounds to nearest)."""
    from moekit.experts import steps
    from moekit.experts.grouped import route_by_expert

    gen = torch.Generator().manual_seed(T)
    idx = _routing(T, E, K, "zipf", (), gen)
    if minus_one:
        idx = idx.masked_fill(torch.rand(idx.shape, generator=gen) < minus_one, -1)
    idx = idx.cuda()
    src = torch.randn(T, D, generator=gen).to(src_dtype).cuda()
    order, inv, offs = route_by_expert(idx, E)
    nv = int(offs[-1])
    got = steps.permute_rows(src, order, inv, out_dtype)
    assert got.shape == (T * K, D) and got.dtype == out_dtype
    assert torch.equal(got[:nv], src.to(out_dtype).index_select(0, order // K)[:nv])
