"""The vectorised expert path equals the per-token reference: outputs and all gradients."""

import pytest
import torch

from moekit.experts import experts_reference, experts_sorted, sort_assignments

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _inputs(T, D, F, E, K, dtype, activation, seed=0, dead_experts=(), minus_one=0.0):
    g = torch.Generator().manual_seed(seed)
    H = 2 * F if activation == "swiglu" else F
    x = torch.randn(T, D, generator=g).to(dtype)
    live = [e for e in range(E) if e not in dead_experts]
    idx = torch.tensor(live)[torch.stack([torch.randperm(len(live), generator=g)[:K] for _ in range(T)])] \
        if T else torch.zeros(0, K, dtype=torch.int64)
    if minus_one:
        idx = idx.masked_fill(torch.rand(idx.shape, generator=g) < minus_one, -1)
    w = torch.rand(T, K, generator=g).to(dtype).masked_fill(idx < 0, 0.0)
    w_in = (torch.randn(E, H, D, generator=g) / D ** 0.5).to(dtype)
    w_out = (torch.randn(E, D, F, generator=g) / F ** 0.5).to(dtype)
    return [t.requires_grad_(True) if t.is_floating_point() else t for t in (x, idx, w, w_in, w_out)]


def _run(fn, args, activation):
    x, idx, w, w_in, w_out = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    y = fn(x, idx, w, w_in, w_out, activation)
    g = torch.Generator().manual_seed(1)
    (y.float() * torch.randn(y.shape, generator=g)).sum().backward()
    return y, [t.grad for t in (x, w, w_in, w_out)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("T,D,F,E,K", [(7, 8, 12, 4, 1), (9, 16, 8, 6, 2), (5, 8, 4, 3, 3)])
def test_sorted_matches_reference(dtype, activation, T, D, F, E, K):
    args = _inputs(T, D, F, E, K, dtype, activation, dead_experts=(E - 1,) if K < E - 1 else ())
    ref_args = [a.double() if a.is_floating_point() else a for a in args] if dtype != torch.float64 else args
    y_ref, g_ref = _run(experts_reference, ref_args, activation)
    y, g = _run(experts_sorted, args, activation)
    tol = TOL[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref.double(), atol=tol, rtol=tol)
    for name, a, b in zip(("x", "weights", "w_in", "w_out"), g, g_ref):
        torch.testing.assert_close(a.double(), b.double(), atol=tol * 5, rtol=tol * 5, msg=name)


def test_minus_one_slots_and_zero_token_experts():
    args = _inputs(11, 8, 6, 5, 3, torch.float64, "swiglu", dead_experts=(0, 4), minus_one=0.3)
    y_ref, g_ref = _run(experts_reference, args, "swiglu")
    y, g = _run(experts_sorted, args, "swiglu")
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    # Experts that got no token get exactly zero gradient (not a missing one).
    assert torch.all(g[2][0] == 0) and torch.all(g[2][4] == 0)
    assert torch.all(g[3][0] == 0) and g[3][1].abs().sum() > 0


@pytest.mark.parametrize("fn", [experts_sorted, experts_reference])
@pytest.mark.parametrize("T", [0, 3])
def test_nothing_routed_gives_zero_not_missing_grads(fn, T):
    """No token (T=0), or tokens whose every slot is -1: zero output, and every input gets a
    zero gradient rather than none (DDP, and expert-parallel ranks that must run the
    collectives' backward, rely on it)."""
    x, idx, w, w_in, w_out = _inputs(T, 8, 6, 4, 2, torch.float32, "swiglu")
    idx = torch.full_like(idx, -1)
    y = fn(x, idx, w, w_in, w_out, "swiglu")
    assert y.shape == (T, 8) and torch.all(y == 0)
    y.sum().backward()
    for name, t in (("x", x), ("weights", w), ("w_in", w_in), ("w_out", w_out)):
        assert t.grad is not None and torch.all(t.grad == 0), name


def test_sort_assignments_groups_by_expert_stably():
    idx = torch.tensor([[2, 0], [0, -1], [2, 1]])
    sa = sort_assignments(idx, 4)
    assert sa.counts_E.tolist() == [2, 1, 2, 0]
    assert sa.token_ids_N.tolist() == [0, 1, 2, 0, 2]
    assert sa.slot_ids_N.tolist() == [1, 2, 5, 0, 4]
