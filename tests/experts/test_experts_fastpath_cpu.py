"""The grouped-GEMM custom-op path on CPU: equals the per-token reference (outputs and all
gradients), its ops pass torch.library.opcheck, compile with fullgraph, and the routing
metadata keeps its invariants. The Triton kernels are checked in Triton's interpreter."""

import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.experts import experts_reference, experts_sorted
from moekit.experts.backends import BACKENDS, resolve_backend
from moekit.experts.grouped import experts_grouped_mm, route_by_expert
from moekit.experts.steps import decode_experts


def _inputs(T, D, F, E, K, activation, seed=0, dead=(), minus_one=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    H = 2 * F if activation == "swiglu" else F
    live = torch.tensor([e for e in range(E) if e not in dead])
    idx = live[torch.stack([torch.randperm(len(live), generator=g)[:K] for _ in range(T)])]
    if minus_one:
        idx = idx.masked_fill(torch.rand(idx.shape, generator=g) < minus_one, -1)
    w = torch.rand(T, K, generator=g, dtype=torch.float64).masked_fill(idx < 0, 0.0)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    w_in = torch.randn(E, H, D, generator=g, dtype=torch.float64) / D ** 0.5
    w_out = torch.randn(E, D, F, generator=g, dtype=torch.float64) / F ** 0.5
    return [t.to(dtype) if t.is_floating_point() else t for t in (x, idx, w, w_in, w_out)]


def _grads(fn, args, activation, seed=1):
    leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    y = fn(*leaves, activation)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, [leaves[i] for i in (0, 2, 3, 4)], dy)
    return y, grads


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CASES = [  # T, D, F, E, K, dead experts, share of -1 slots
    (9, 16, 8, 6, 2, (5,), 0.0),
    (7, 8, 16, 4, 1, (0,), 0.0),
    (5, 16, 8, 4, 4, (), 0.2),  # k = E
    (12, 8, 8, 7, 3, (1, 6), 0.3),
]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_matches_reference(activation, case, dtype, tol):
    T, D, F, E, K, dead, minus_one = case
    args = _inputs(T, D, F, E, K, activation, dead=dead, minus_one=minus_one)
    y_ref, g_ref = _grads(experts_reference, args, activation)
    low = [a.to(dtype) if a.is_floating_point() else a for a in args]
    y, g = _grads(experts_grouped_mm, low, activation)
    assert y.dtype == dtype
    assert _rel(y, y_ref) < tol
    for name, a, b in zip(("x", "weights", "w_in", "w_out"), g, g_ref):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert _rel(a, b) < 2 * tol, (name, _rel(a, b))
    for e in dead:  # experts without tokens: exactly zero weight gradient
        assert torch.all(g[2][e] == 0) and torch.all(g[3][e] == 0)
    assert torch.all(g[1][args[1] < 0] == 0)  # -1 slots: zero routing-weight gradient


def test_falls_back_for_fp64_and_unaligned_widths():
    for D, F, dtype in ((16, 8, torch.float64), (6, 5, torch.float32)):
        args = _inputs(6, D, F, 4, 2, "swiglu", dtype=dtype)
        y, g = _grads(experts_grouped_mm, args, "swiglu")
        y_s, g_s = _grads(experts_sorted, args, "swiglu")
        torch.testing.assert_close(y, y_s)
        for a, b in zip(g, g_s):
            torch.testing.assert_close(a, b)


def test_rejects_bad_operands():
    x, idx, w, w_in, w_out = _inputs(3, 8, 8, 2, 1, "swiglu", dtype=torch.float32)
    with pytest.raises(ValueError, match="activation"):
        experts_grouped_mm(x, idx, w, w_in, w_out, "relu")
    with pytest.raises(ValueError, match="indices_TK"):
        experts_grouped_mm(x, idx[:2], w[:2], w_in, w_out, "swiglu")
    with pytest.raises(ValueError, match="weights_TK"):
        experts_grouped_mm(x, idx, w[:, :0], w_in, w_out, "swiglu")
    with pytest.raises(ValueError, match="w_in_EHD"):
        experts_grouped_mm(x, idx, w, w_in, w_out, "gelu")  # gelu wants H = F rows


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_decode_steps_match_reference(activation):
    # The per-slot decode path (its torch definition; the Triton kernels are checked against
    # it below and on the GPU): T=1 and T=2 with a -1 slot, fp32 and bf16.
    for T, minus_one in ((1, 0.0), (2, 0.3)):
        args = _inputs(T, 16, 8, 6, 4, activation, seed=T, minus_one=minus_one)
        y_ref = experts_reference(*args, activation)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            low = [a.to(dtype) if a.is_floating_point() else a for a in args]
            assert _rel(decode_experts(*low, activation), y_ref) < tol


def test_compile_fullgraph_equals_eager():
    args = _inputs(10, 16, 8, 5, 2, "swiglu", dead=(3,), minus_one=0.1, dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(experts_grouped_mm, fullgraph=True, backend="aot_eager")
    y, g = _grads(experts_grouped_mm, args, "swiglu")
    y_c, g_c = _grads(compiled, args, "swiglu")
    torch.testing.assert_close(y_c, y, rtol=0, atol=0)
    for a, b in zip(g_c, g):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_opcheck_custom_ops():
    x, idx, w, w_in, w_out = _inputs(6, 8, 8, 3, 2, "swiglu", minus_one=0.2, dtype=torch.float32)
    torch.library.opcheck(torch.ops.moekit.route_by_expert.default, (idx, 3))
    # No -1 slots here: their rows of the saved h_NH are left unwritten (never read), which
    # opcheck's output comparison would flag.
    idx = idx.abs()
    order, inv, offs = route_by_expert(idx, 3)
    leaves = [t.requires_grad_() for t in (x, w, w_in, w_out)]
    torch.library.opcheck(torch.ops.moekit.experts_grouped_fwd.default,
                          (*leaves, order, inv, offs, "swiglu"),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_autocast_runs_in_autocast_dtype():
    args = _inputs(8, 16, 8, 4, 2, "swiglu", dtype=torch.float32)
    y_ref = experts_reference(*args, "swiglu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts_grouped_mm(*args, "swiglu")
    assert y.dtype == torch.bfloat16 and _rel(y, y_ref) < 2e-2


def test_auto_backend_is_grouped_on_cuda_only():
    assert "grouped_mm" in BACKENDS
    assert resolve_backend("auto", torch.device("cuda")) == "grouped_mm"
    assert resolve_backend("auto", torch.device("cpu")) == "sorted"


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 12), K=st.integers(1, 4), E=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_route_by_expert_invariants(T, K, E, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, E, (T, K), generator=g)
    order, inv, offs = route_by_expert(idx, E)
    flat = idx.reshape(-1)
    assert sorted(order.tolist()) == list(range(T * K))  # a permutation of the slots
    counts = torch.bincount(flat[flat >= 0], minlength=E)
    assert offs.dtype == torch.int32 and offs.tolist() == counts.cumsum(0).tolist()
    key = torch.where(flat < 0, E, flat)[order]
    assert torch.all(key[1:] >= key[:-1])  # grouped by expert, -1 slots last
    valid = flat >= 0
    assert torch.all(inv.reshape(-1)[~valid] == -1)
    assert torch.equal(order[inv.reshape(-1)[valid]], torch.nonzero(valid)[:, 0])


_INTERPRETER_CHECK = textwrap.dedent("""
    import torch
    from moekit.experts import steps, triton_kernels as tk
    from moekit.experts.grouped import route_by_expert
    torch.manual_seed(0)
    T, K, F, D, E = 7, 3, 24, 40, 4
    for act in ("swiglu", "gelu"):
        H = 2 * F if act == "swiglu" else F
        idx = torch.randint(0, E, (T, K)); idx[1, 2] = -1; idx[4, 0] = -1
        order, inv, offs = route_by_expert(idx, E)
        nv = int(offs[-1])
        h = torch.randn(T * K, H); h[nv:] = float("nan")  # unwritten rows must never leak
        dau = torch.randn(T * K, F); dau[nv:] = float("nan")
        w = torch.rand(T * K)
        torch.testing.assert_close(tk.act_forward(h, offs, act)[:nv], steps.act_forward(h, offs, act)[:nv])
        for a, b in zip(tk.act_backward(h, dau, w, order, offs, act), steps.act_backward(h, dau, w, order, offs, act)):
            torch.testing.assert_close(a[:nv], b[:nv])
        # permutation into expert order (the interpreter casts fp32 -> bf16 by truncation, so
        # the cast itself is checked on the GPU only)
        for xt in (torch.randn(T, D), torch.randn(T, D).bfloat16()):
            want = xt.index_select(0, order // K)[:nv]
            torch.testing.assert_close(tk.scatter_rows(xt, inv, T * K, xt.dtype)[:nv], want, rtol=0, atol=0)
            torch.testing.assert_close(steps.permute_rows(xt, order, inv, xt.dtype)[:nv], want, rtol=0, atol=0)
        src = torch.randn(T * K, D); src[nv:] = float("nan")
        for wt in (torch.rand(T, K), None):
            torch.testing.assert_close(tk.gather_sum(src, inv, wt, torch.float32), steps.gather_sum(src, inv, wt, torch.float32))
        # decode kernels (per slot, no sort) against their torch definition
        from moekit.experts import triton_decode as td
        x = torch.randn(2, D); idx2 = idx[:2].contiguous(); w2 = torch.rand(2, K).masked_fill(idx2 < 0, 0.0)
        w_in = torch.randn(E, H, D) / D ** 0.5; w_out = torch.randn(E, D, F) / F ** 0.5
        a = td.slot_gate_up(x, idx2, w_in, act)
        y = tk.gather_sum(td.slot_down(a, idx2, w_out), None, w2, torch.float32, shape_TK=(2, K))
        torch.testing.assert_close(y, steps.decode_experts(x, idx2, w2, w_in, w_out, act), rtol=1e-4, atol=1e-5)
    print("ok")
""")


def test_triton_kernels_in_interpreter(run_interpreted):
    run_interpreted(_INTERPRETER_CHECK)
