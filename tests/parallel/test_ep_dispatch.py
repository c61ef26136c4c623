"""Single-process tests of the expert-parallel index arithmetic (moekit.parallel.dispatch and
the transfer planning of moekit.parallel.rebalance): no process group needed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.experts import experts_reference
from moekit.experts.reference import expert_mlp
from moekit.metrics import moves
from moekit.parallel import (
    assignment_slots,
    collect,
    combine,
    dispatch_order,
    plan_transfers,
    received_routing,
    received_slots,
    resolve_group,
    row_dispatch,
    slot_tables,
)
from moekit.parallel.dispatch import local_slots, lookup_tables


@st.composite
def placements(draw, max_experts=8, max_ranks=4):
    """A random valid phy2log [R] with every expert present, and the number of ranks."""
    num_experts = draw(st.integers(1, max_experts))
    num_ranks = draw(st.integers(1, max_ranks))
    extra = draw(st.integers(0, 2 * num_ranks))
    num_slots = -(-(num_experts + extra) // num_ranks) * num_ranks
    fill = draw(st.lists(st.integers(0, num_experts - 1), min_size=num_slots - num_experts,
                         max_size=num_slots - num_experts))
    perm = draw(st.permutations(list(range(num_slots))))
    p2l = torch.tensor(list(range(num_experts)) + fill)[torch.tensor(perm)]
    return p2l, num_experts, num_ranks


@given(placements())
@settings(max_examples=60, deadline=None)
def test_slot_tables_invert_phy2log(case):
    p2l, num_experts, num_ranks = case
    t = slot_tables(p2l, num_experts, num_ranks)
    assert torch.equal(t.logcnt_E, torch.bincount(p2l, minlength=num_experts))
    for e in range(num_experts):
        slots = t.log2phy_EM[e]
        cnt = int(t.logcnt_E[e])
        assert torch.equal(slots[:cnt], torch.nonzero(p2l == e)[:, 0])  # increasing slot order
        assert bool((slots[cnt:] == -1).all())


@st.composite
def routed(draw):
    """A placement, a rank of it, and a routing ``[T, k]`` over its experts (``-1`` allowed)."""
    p2l, num_experts, num_ranks = draw(placements())
    num_tokens, top_k = draw(st.integers(0, 12)), min(draw(st.integers(1, 3)), num_experts)
    rank = draw(st.integers(0, num_ranks - 1))
    flat = draw(st.lists(st.integers(-1, num_experts - 1), min_size=num_tokens * top_k, max_size=num_tokens * top_k))
    idx = torch.tensor(flat, dtype=torch.long).view(num_tokens, top_k)
    return p2l, num_experts, num_ranks, rank, idx


@given(routed())
@settings(max_examples=80, deadline=None)
def test_dispatch_order_covers_every_assignment_once_and_splits_replicas_evenly(case):
    p2l, num_experts, num_ranks, rank, idx = case
    num_tokens, top_k = idx.shape
    t = slot_tables(p2l, num_experts, num_ranks)
    order = dispatch_order(idx, t, num_ranks, rank)
    valid = torch.nonzero(idx.reshape(-1) >= 0)[:, 0]
    n = int(order.send_counts_PS.sum())
    assert n == valid.numel() and order.flat_ids_N.numel() == num_tokens * top_k
    # each valid assignment exactly once (first n entries), unused slots last with slot id R
    assert torch.equal(torch.sort(order.flat_ids_N[:n]).values, valid)
    assert bool((order.slot_ids_N[n:] == p2l.shape[0]).all())
    assert torch.equal(order.token_ids_N, order.flat_ids_N // top_k)
    # slots in send order, each computing the assignment's expert
    slots = torch.repeat_interleave(torch.arange(p2l.shape[0]), order.send_counts_PS.reshape(-1))
    assert torch.equal(slots, order.slot_ids_N[:n])
    assert order.send_counts_PS.shape == (num_ranks, p2l.shape[0] // num_ranks)
    assert torch.equal(p2l[slots], idx.reshape(-1)[order.flat_ids_N[:n]])
    # replicas of one expert share its assignments to within one
    per_slot = order.send_counts_PS.reshape(-1)
    for e in range(num_experts):
        loads = per_slot[p2l == e]
        assert int(loads.max() - loads.min()) <= 1


def test_dispatch_remainders_go_to_different_replicas_on_different_ranks():
    p2l = torch.tensor([0, 1, 0, 1])  # two replicas of each expert on two ranks
    t = slot_tables(p2l, 2, 2)
    idx = torch.tensor([[0]])  # one assignment: the remainder
    first = [dispatch_order(idx, t, 2, r).send_counts_PS.reshape(-1).tolist() for r in range(2)]
    assert first == [[1, 0, 0, 0], [0, 0, 1, 0]]


def test_received_slots_are_source_major_then_slot():
    counts = torch.tensor([[2, 0, 1], [0, 1, 1]])
    assert received_slots(counts).tolist() == [0, 0, 2, 1, 2]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float64, 1e-12)])
@pytest.mark.parametrize("top_k", [1, 3, 6])
def test_one_rank_pipeline_equals_reference_outputs_and_grads(dtype, tol, top_k):
    """Dispatch -> per-slot MLP -> combine on one rank (with replicas and an unused expert)
    equals experts_reference, in outputs and in the gradients of x, weights and expert weights."""
    torch.manual_seed(top_k)
    num_experts, dim, ffn, num_tokens = 6, 8, 5, 7
    p2l = torch.tensor([3, 0, 1, 2, 3, 4, 5, 3])
    x = torch.randn(num_tokens, dim, dtype=dtype, requires_grad=True)
    idx = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)])
    idx[idx == 5] = 4 if top_k < num_experts else 5  # expert 5 gets no token unless k = E
    idx[0, -1] = -1  # one unused slot
    w = torch.rand(num_tokens, top_k, dtype=dtype, requires_grad=True)
    w_in = (torch.randn(num_experts, 2 * ffn, dim, dtype=dtype) / 3).requires_grad_()
    w_out = (torch.randn(num_experts, dim, ffn, dtype=dtype) / 3).requires_grad_()
    g = torch.randn(num_tokens, dim, dtype=dtype)

    t = slot_tables(p2l, num_experts, 1)
    order = dispatch_order(idx, t, 1, 0)
    x_N = x[order.token_ids_N[: int(order.send_counts_PS.sum())]]
    slot_N = received_slots(order.send_counts_PS)
    y_N = torch.cat([expert_mlp(x_N[slot_N == s], w_in[p2l[s]], w_out[p2l[s]], "swiglu")
                     for s in range(p2l.shape[0])])
    y = combine(y_N, order, w)
    grads = torch.autograd.grad((y * g).sum(), (x, w, w_in, w_out))

    y_ref = experts_reference(x, idx, w, w_in, w_out, "swiglu")
    grads_ref = torch.autograd.grad((y_ref * g).sum(), (x, w, w_in, w_out))
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@given(routed())
@settings(max_examples=80, deadline=None)
def test_lookup_tables_equal_the_slot_arithmetic(case):
    """The fixed-size dispatch's gather tables give exactly assignment_slots / local_slots."""
    p2l, num_experts, num_ranks, rank, idx_TK = case
    tables = slot_tables(p2l, num_experts, num_ranks)
    per = tables.num_slots // num_ranks
    slot_E1, local_R1 = lookup_tables(tables, rank, per)
    assert slot_E1.shape == (num_experts + 1,) and local_R1.shape == (tables.num_slots + 1,)
    every_R = torch.arange(-1, tables.num_slots)  # every physical slot, and -1
    assert torch.equal(local_R1[every_R], local_slots(every_R, rank, per))
    replicated = bool((tables.logcnt_E > 1).any())
    slot_TK = assignment_slots(idx_TK, tables, rank, replicated)
    assert torch.equal(local_R1[slot_TK], local_slots(slot_TK, rank, per))
    if not replicated:  # one slot per expert: the routing's slots are one gather
        assert torch.equal(slot_E1[idx_TK], slot_TK)
    assert torch.equal(slot_E1[:-1], tables.log2phy_EM[:, 0]) and slot_E1[-1] == -1


@given(placements(max_ranks=4), st.data())
@settings(max_examples=60, deadline=None)
def test_plan_transfers_are_exactly_the_moves(case, data):
    old, num_experts, num_ranks = case
    perm = torch.tensor(data.draw(st.permutations(list(range(old.shape[0])))))
    new = old.clone()
    new[: num_experts] = torch.arange(num_experts)
    new = new[perm]
    transfers = plan_transfers(old, new, num_ranks)
    assert len(transfers) == moves(old[None], new[None], num_ranks)
    per = old.shape[0] // num_ranks
    for tr in transfers:
        old_src = old[tr.src_rank * per:(tr.src_rank + 1) * per]
        assert int(old_src[tr.src_slot]) == tr.expert
        assert tr.expert not in old[tr.dst_rank * per:(tr.dst_rank + 1) * per].tolist()
        assert tr.expert in new[tr.dst_rank * per:(tr.dst_rank + 1) * per].tolist()
    assert len({(tr.dst_rank, tr.expert) for tr in transfers}) == len(transfers)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="phy2log: expected every logical expert"):
        slot_tables(torch.tensor([0, 0, 1, 1]), 3, 2)
    with pytest.raises(ValueError, match="phy2log: expected R >= num_experts"):
        slot_tables(torch.tensor([0, 1, 2]), 3, 2)
    with pytest.raises(ValueError, match=r"phy2log: expected expert ids in \[0, 2\)"):
        slot_tables(torch.tensor([0, 2]), 2, 1)
    with pytest.raises(ValueError, match="phy2log: expected a 1-D integer tensor"):
        slot_tables(torch.tensor([[0, 1]]), 2, 1)
    with pytest.raises(ValueError, match="new_phy2log"):
        plan_transfers(torch.tensor([0, 1]), torch.tensor([0, 1, 1, 0]), 2)
    if not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match="group: expected an initialised"):
            resolve_group()


@given(routed())
@settings(max_examples=80, deadline=None)
def test_row_dispatch_sends_each_token_once_per_destination(case):
    p2l, num_experts, num_ranks, rank, idx = case
    num_tokens, top_k = idx.shape
    t = slot_tables(p2l, num_experts, num_ranks)
    per = p2l.shape[0] // num_ranks
    slot_TK = assignment_slots(idx, t, rank)
    # the same slots as the sorted dispatch (so both modes balance replicas alike), with or
    # without the host's "replicated" hint
    order = dispatch_order(idx, t, num_ranks, rank)
    n = int(order.send_counts_PS.sum())
    assert torch.equal(slot_TK.reshape(-1)[order.flat_ids_N[:n]], order.slot_ids_N[:n])
    assert bool((slot_TK[idx < 0] == -1).all())
    if int(t.logcnt_E.max()) == 1:
        assert torch.equal(assignment_slots(idx, t, rank, replicated=False), slot_TK)
    disp = row_dispatch(slot_TK, num_ranks, per)
    rows_P, assign_P = disp.send_counts_P2.unbind(1)
    num_rows, num_assign = int(rows_P.sum()), int(assign_P.sum())
    # one row per (destination, token) pair, destination-major, tokens ascending
    pairs = sorted({(int(s) // per, tok) for tok in range(num_tokens) for s in slot_TK[tok].tolist() if s >= 0})
    dst_of_row = torch.repeat_interleave(torch.arange(num_ranks), rows_P).tolist()
    assert list(zip(dst_of_row, disp.token_ids_V[:num_rows].tolist())) == pairs
    # inv_TP is the inverse of token_ids_V
    for v, (p, tok) in enumerate(pairs):
        assert int(disp.inv_TP[tok, p]) == v
    assert int((disp.inv_TP >= 0).sum()) == num_rows
    # every valid assignment once, destination-major, in flat order within a destination
    perm = disp.perm_N[:num_assign]
    valid = torch.nonzero(slot_TK.reshape(-1) >= 0)[:, 0]
    assert torch.equal(torch.sort(perm).values, valid)
    dst_A = slot_TK.reshape(-1)[perm] // per
    assert torch.equal(dst_A, torch.repeat_interleave(torch.arange(num_ranks), assign_P))
    for p in range(num_ranks):
        assert bool((perm[dst_A == p].diff() > 0).all())
    # meta = (row from the destination's first row) * S + local slot
    row_start = torch.cumsum(rows_P, 0) - rows_P
    meta = disp.meta_N[:num_assign]
    assert torch.equal(meta % per, slot_TK.reshape(-1)[perm] % per)
    assert torch.equal(disp.token_ids_V[meta // per + row_start[dst_A]], perm // top_k)


@pytest.mark.parametrize("top_k", [1, 3, 6])
def test_one_rank_dedup_pipeline_equals_reference_outputs_and_grads(top_k):
    """row_dispatch -> received_routing -> backend with the received routing -> collect
    equals experts_reference (outputs and all gradients), replicas included."""
    torch.manual_seed(10 + top_k)
    num_experts, dim, ffn, num_tokens = 6, 8, 5, 9
    p2l = torch.tensor([3, 0, 1, 2, 3, 4, 5, 3])
    x = torch.randn(num_tokens, dim, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)])
    idx[1, 0] = -1
    idx[4, :] = -1  # a token with no expert at all
    w = torch.rand(num_tokens, top_k, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(num_experts, 2 * ffn, dim, dtype=torch.float64).requires_grad_()
    w_out = torch.randn(num_experts, dim, ffn, dtype=torch.float64).requires_grad_()
    g = torch.randn(num_tokens, dim, dtype=torch.float64)

    slot_TK = assignment_slots(idx, slot_tables(p2l, num_experts, 1), 0)
    disp = row_dispatch(slot_TK, 1, p2l.shape[0])
    num_rows, num_assign = disp.send_counts_P2.sum(0).tolist()
    tokens_U = disp.token_ids_V[:num_rows]
    assert tokens_U.tolist() == sorted(set((torch.nonzero(idx >= 0)[:, 0]).tolist()))  # one row per token
    meta = disp.meta_N[:num_assign]
    ind_UK, w_UK = received_routing(disp.send_counts_P2, meta // p2l.shape[0], meta % p2l.shape[0],
                                    w.reshape(-1)[disp.perm_N[:num_assign]], top_k, num_rows)
    y_U = experts_reference(x[tokens_U], ind_UK, w_UK, w_in[p2l], w_out[p2l], "swiglu")
    y = collect(y_U, tokens_U, disp.inv_TP)
    grads = torch.autograd.grad((y * g).sum(), (x, w, w_in, w_out))

    y_ref = experts_reference(x, idx, w, w_in, w_out, "swiglu")
    grads_ref = torch.autograd.grad((y_ref * g).sum(), (x, w, w_in, w_out))
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
