"""Single-process tests of the lean pieces of the expert-parallel layer: the gather /
gather-sum row maps (moekit.parallel.rows), the compact hand-off to the grouped-GEMM expert
ops, and the per-placement replica reduction lists (moekit.parallel.replicas)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.experts import experts_reference
from moekit.parallel import (
    collect,
    compact_grouped_experts,
    gather_sum_rows,
    replica_sync,
    spread,
)


def _rows_case(num_tokens, num_ranks, seed):
    """token_V / inv_TP of a random (token, rank) incidence, like row_dispatch builds."""
    gen = torch.Generator().manual_seed(seed)
    has_TP = torch.rand(num_tokens, num_ranks, generator=gen) < 0.6
    pairs = [(p, t) for p in range(num_ranks) for t in range(num_tokens) if has_TP[t, p]]
    inv_TP = torch.full((num_tokens, num_ranks), -1, dtype=torch.long)
    for v, (p, t) in enumerate(pairs):
        inv_TP[t, p] = v
    token_V = torch.tensor([t for _, t in pairs], dtype=torch.long)
    return token_V, inv_TP


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("num_tokens,num_ranks", [(9, 2), (6, 4), (0, 2), (5, 1)])
def test_spread_and_collect_are_adjoint_gathers(dtype, tol, num_tokens, num_ranks):
    token_V, inv_TP = _rows_case(num_tokens, num_ranks, seed=num_tokens * 7 + num_ranks)
    x = torch.randn(num_tokens, 6, dtype=torch.float64).to(dtype).requires_grad_()
    y = torch.randn(token_V.shape[0], 6, dtype=torch.float64).to(dtype).requires_grad_()
    gx = torch.randn(token_V.shape[0], 6, dtype=torch.float64).to(dtype)
    gy = torch.randn(num_tokens, 6, dtype=torch.float64).to(dtype)

    xs = spread(x, token_V, inv_TP)
    yc = collect(y, token_V, inv_TP)
    dx, = torch.autograd.grad((xs * gx).sum(), x)
    dy, = torch.autograd.grad((yc * gy).sum(), y)
    # reference: index / index_add in fp64
    x64, y64, gx64, gy64 = x.detach().double(), y.detach().double(), gx.double(), gy.double()
    ref_c = torch.zeros(num_tokens, 6, dtype=torch.float64).index_add(0, token_V, y64)
    ref_dx = torch.zeros(num_tokens, 6, dtype=torch.float64).index_add(0, token_V, gx64)
    assert xs.dtype == yc.dtype == dtype
    torch.testing.assert_close(xs.double(), x64[token_V], atol=0, rtol=0)
    torch.testing.assert_close(yc.double(), ref_c, atol=tol, rtol=tol)
    torch.testing.assert_close(dx.double(), ref_dx, atol=tol, rtol=tol)
    torch.testing.assert_close(dy.double(), gy64[token_V], atol=0, rtol=0)
    # tokens with no row get zeros
    none = (inv_TP < 0).all(1)
    assert bool((yc[none] == 0).all())
    assert torch.equal(gather_sum_rows(y.detach(), inv_TP), yc.detach())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("top_k", [1, 3, 4])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_compact_grouped_experts_equals_reference(dtype, tol, top_k, activation):
    """Only the valid rows of a -1-padded routing (as a dedup receiver gets it) go through the
    grouped-GEMM ops (CPU kernels here): outputs and all gradients equal experts_reference,
    with rows that have no slot and a slot that gets no row."""
    torch.manual_seed(top_k)
    rows, slots, dim, ffn = 11, 5, 16, 8
    idx = torch.stack([torch.randperm(slots - 1)[:top_k] for _ in range(rows)])  # slot 4 gets nothing
    idx[torch.rand(rows, top_k) < 0.4] = -1
    idx[3] = -1
    w = torch.rand(rows, top_k).to(dtype).requires_grad_()
    x = torch.randn(rows, dim).to(dtype).requires_grad_()
    h = 2 * ffn if activation == "swiglu" else ffn
    w_in = (torch.randn(slots, h, dim) / 4).to(dtype).requires_grad_()
    w_out = (torch.randn(slots, dim, ffn) / 3).to(dtype).requires_grad_()
    g = torch.randn(rows, dim).to(dtype)

    y = compact_grouped_experts(x, idx, w, w_in, w_out, int((idx >= 0).sum()), activation)
    grads = torch.autograd.grad((y.float() * g.float()).sum(), (x, w, w_in, w_out))
    f32 = [t.detach().float().requires_grad_() for t in (x, w, w_in, w_out)]
    y_ref = experts_reference(f32[0], idx, f32[1], f32[2], f32[3], activation)
    grads_ref = torch.autograd.grad((y_ref * g.float()).sum(), f32)
    assert y.dtype == dtype
    scale = max(1.0, float(y_ref.detach().abs().max()))
    torch.testing.assert_close(y.float(), y_ref, atol=tol * scale, rtol=tol)
    for name, a, b in zip(("x", "weights", "w_in", "w_out"), grads, grads_ref):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a.float(), b, atol=tol * scale, rtol=tol, msg=lambda m, n=name: f"grad {n}: {m}")


@st.composite
def placements(draw):
    num_experts = draw(st.integers(1, 6))
    num_ranks = draw(st.integers(1, 4))
    per = draw(st.integers(-(-num_experts // num_ranks), -(-num_experts // num_ranks) + 3))
    fill = draw(st.lists(st.integers(0, num_experts - 1), min_size=per * num_ranks - num_experts,
                         max_size=per * num_ranks - num_experts))
    perm = draw(st.permutations(list(range(per * num_ranks))))
    return torch.tensor(list(range(num_experts)) + fill)[torch.tensor(perm)], num_ranks


@given(placements())
@settings(max_examples=80, deadline=None)
def test_replica_sync_sums_every_replica_of_an_expert(case):
    """Simulate the reduction on all ranks, all-reduce by all-reduce (the ranks' cross-rank
    groups must line up one to one): every replica ends with the sum over all replicas of
    its expert; experts without replicas are untouched."""
    p2l, num_ranks = case
    per = p2l.shape[0] // num_ranks
    grad_R = torch.randn(p2l.shape[0], 3, dtype=torch.float64)
    out = grad_R.clone()
    syncs = [replica_sync(p2l, r, num_ranks) for r in range(num_ranks)]
    num_cross = {s.num_all_reduces for s in syncs}
    assert len(num_cross) == 1  # every rank takes part in the same all-reduces
    heads = [[] for _ in range(num_ranks)]  # per rank, the tensor each of its groups all-reduces
    for r, s in enumerate(syncs):
        local = out[r * per:(r + 1) * per]
        for slots, cross in s.groups:
            head = local[slots[0]] if slots else torch.zeros(3, dtype=torch.float64)
            for slot in slots[1:]:
                head.add_(local[slot])
            heads[r].append((head, slots, cross))
    for i in range(num_cross.pop()):  # the i-th all-reduce of every rank
        total = sum(heads[r][i][0] for r in range(num_ranks))
        for r in range(num_ranks):
            assert heads[r][i][2]  # cross-rank groups come first on every rank
            heads[r][i][0].copy_(total)
    for r in range(num_ranks):
        local = out[r * per:(r + 1) * per]
        for head, slots, _ in heads[r]:
            for slot in slots[1:]:
                local[slot].copy_(head)
    for slot in range(p2l.shape[0]):
        expected = grad_R[p2l == p2l[slot]].sum(0)
        torch.testing.assert_close(out[slot], expected)
