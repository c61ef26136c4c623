"""Single-process tests of the index arithmetic of the overlapped dispatch
(moekit.parallel.overlap): rows only for other ranks, each with its destination's routing.
The end-to-end equivalence (outputs and all gradients vs the single-process layer, gloo 2 and
4 ranks, NCCL with the side stream) runs in ep_worker.py with ``overlap=True``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.experts import ExpertsConfig
from moekit.parallel import assignment_slots, slot_tables
from moekit.parallel.overlap import remote_rows, row_routing


@st.composite
def routed(draw):
    """A placement (``R`` slots over ``P`` ranks), a rank, routing ``[T, k]`` (``-1`` allowed)
    and routing weights."""
    num_ranks, per_rank = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    num_slots = num_ranks * per_rank
    num_experts = draw(st.integers(1, num_slots))  # every expert once, the spare slots replicas
    spare = draw(st.lists(st.integers(0, num_experts - 1), min_size=num_slots - num_experts,
                          max_size=num_slots - num_experts))
    p2l = torch.tensor(draw(st.permutations(list(range(num_experts)) + spare)))
    num_tokens, top_k = draw(st.integers(0, 10)), min(draw(st.integers(1, 4)), num_experts)
    rank = draw(st.integers(0, num_ranks - 1))
    flat = draw(st.lists(st.integers(-1, num_experts - 1), min_size=num_tokens * top_k,
                         max_size=num_tokens * top_k))
    idx = torch.tensor(flat, dtype=torch.long).view(num_tokens, top_k)
    weights = torch.rand(num_tokens, top_k, generator=torch.Generator().manual_seed(len(flat)), dtype=torch.float64)
    return p2l, num_experts, num_ranks, rank, idx, weights


@given(routed())
@settings(max_examples=80, deadline=None)
def test_remote_rows_one_row_per_token_and_other_rank_with_its_routing(case):
    p2l, num_experts, num_ranks, rank, idx, weights = case
    num_tokens, top_k = idx.shape
    per = p2l.shape[0] // num_ranks
    slot_TK = assignment_slots(idx, slot_tables(p2l, num_experts, num_ranks), rank)
    rows = remote_rows(slot_TK, rank, num_ranks, per)
    rows_P, assign_P = rows.send_counts_P2.unbind(1)
    num_rows = int(rows_P.sum())
    # exactly the (other rank, token) pairs with a choice there, destination-major, tokens ascending
    pairs = sorted({(int(s) // per, tok) for tok in range(num_tokens) for s in slot_TK[tok].tolist()
                    if s >= 0 and int(s) // per != rank})
    got = list(zip(rows.dst_V[:num_rows].tolist(), rows.token_ids_V[:num_rows].tolist()))
    assert got == pairs
    assert bool((rows.dst_V[num_rows:] == num_ranks).all())
    assert int(rows_P[rank]) == 0 and int(assign_P[rank]) == 0
    # per destination: its rows and its choices
    for p in range(num_ranks):
        on_p = (slot_TK >= 0) & (slot_TK // per == p)
        if p != rank:
            assert int(rows_P[p]) == int(on_p.any(1).sum()) and int(assign_P[p]) == int(on_p.sum())
    # inv_TP is the inverse of token_ids_V; this rank's column is empty
    for v, (p, tok) in enumerate(pairs):
        assert int(rows.inv_TP[tok, p]) == v
    assert int((rows.inv_TP >= 0).sum()) == num_rows
    assert bool((rows.inv_TP[:, rank] == -1).all())
    # the routing each destination sees: its local slots, the choice's weight; -1 / 0 elsewhere
    w = weights.clone().requires_grad_()
    slots_VK, weights_VK = row_routing(slot_TK, w, rows, num_rows, per)
    for v, (p, tok) in enumerate(pairs):
        for j in range(top_k):
            s = int(slot_TK[tok, j])
            if s >= 0 and s // per == p:
                assert int(slots_VK[v, j]) == s - p * per and float(weights_VK.detach()[v, j]) == float(weights[tok, j])
            else:
                assert int(slots_VK[v, j]) == -1 and float(weights_VK.detach()[v, j]) == 0.0
    # the weights' gradient: each choice sent to another rank gets its row's gradient, once
    g = torch.randn(weights_VK.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (weights_VK * g).sum().backward()
    expected = torch.zeros_like(weights)
    for v, (p, tok) in enumerate(pairs):
        for j in range(top_k):
            s = int(slot_TK[tok, j])
            if s >= 0 and s // per == p:
                expected[tok, j] += g[v, j]
    if num_rows:
        assert torch.equal(w.grad, expected)


def test_overlap_needs_the_deduplicated_dispatch():
    import torch.distributed as dist

    from moekit.parallel import ExpertParallelExperts

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    # checked before the group is used, so no process group is needed
    for kw in ({"dedup": False}, {"dedup": False, "max_tokens_per_rank": 8}):
        with pytest.raises(ValueError, match="overlap: expected False unless dedup=True"):
            ExpertParallelExperts(ExpertsConfig(8, 8, 2), None, overlap=True, **kw)


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("tokens", [4, 2, 0])
def test_sum_partials_values_grads_and_no_full_slice(blocks, tokens):
    """``sum_partials`` adds each token's rows of the ``B`` blocks (fp32 inside); where the
    blocks hold exactly ``T`` rows its graph has no slice, whose backward would fill a zero
    tensor of the whole input and copy the gradient into it."""
    from moekit.parallel.rows import sum_partials

    cap, dim = 4, 3
    y = torch.randn(blocks * cap, dim, dtype=torch.float64, requires_grad=True)
    out = sum_partials(y, blocks, cap, tokens, torch.float64)
    expect = y.detach().view(blocks, cap, dim)[:, :tokens].sum(0)
    assert torch.equal(out.detach(), expect)
    g = torch.randn(tokens, dim, dtype=torch.float64)
    out.backward(g)
    grad = torch.zeros(blocks, cap, dim, dtype=torch.float64)
    grad[:, :tokens] = g
    assert torch.equal(y.grad, grad.view(-1, dim))

    def nodes(fn, seen=()):
        if fn is None or fn in seen:
            return []
        return [type(fn).__name__] + [n for f, _ in fn.next_functions for n in nodes(f, seen + (fn,))]

    names = nodes(out.grad_fn) if out.grad_fn is not None else []
    assert ("SliceBackward0" in names) == (tokens < cap), names
