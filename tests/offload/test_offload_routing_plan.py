"""The host-side routing plan and the batched expert compute of the offload engine
(moekit.offload.routing_plan) against the eager per-expert loop, bit for bit, and the merged
demand copies (moekit.offload.copies)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.offload.copies import ChunkedCopier
from moekit.offload.routing_plan import (
    SMALL,
    _plan_numpy,
    _plan_python,
    combine_in_expert_order,
    experts_output_reference,
    plan_routing,
    write_expert_rows,
)


def _batched(x_TD, indices_TK, weights_TK, w_in, w_out, act=F.silu):
    """What the engine does with a plan: gather once, one block per expert, ordered sums."""
    plan = plan_routing(indices_TK.reshape(-1).tolist(), indices_TK.shape[1], w_in.shape[0])
    n = plan.num_assignments
    x_ND = x_TD.index_select(0, plan.tok_N)
    w_N1 = weights_TK.reshape(-1).index_select(0, plan.flat_N).unsqueeze(1)
    y = torch.empty((n + 1, x_TD.shape[1]), dtype=x_TD.dtype)
    if plan.needs_zero_row:
        y[n].zero_()
    for e in reversed(plan.needed()):  # any order: the sums are ordered in combine
        s, t = plan.starts_E1[e], plan.starts_E1[e + 1]
        write_expert_rows(y[s:t], x_ND[s:t], w_N1[s:t], w_in[e], w_out[e], act)
    return combine_in_expert_order(y, plan.comb_KT, x_TD.shape[0])


def _routing(tokens, k, experts, gen, pad=0.0):
    idx = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    if pad:
        drop = torch.rand(idx.shape, generator=gen) < pad
        idx = torch.where(drop, torch.where(torch.rand(idx.shape, generator=gen) < 0.5, -1, experts), idx)
    return idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("tokens,k,experts,weights_dtype,pad", [
    (1, 2, 8, torch.float32, 0.0), (8, 2, 8, None, 0.0), (5, 1, 4, None, 0.0), (6, 4, 4, torch.float32, 0.0),
    (7, 3, 16, None, 0.3), (3, 8, 64, torch.float32, 0.0), (1, 1, 1, None, 0.0)])
def test_batched_compute_is_bit_identical_to_the_eager_loop(dtype, tokens, k, experts, weights_dtype, pad):
    gen = torch.Generator().manual_seed(tokens * 100 + k)
    dim, ffn = 16, 24
    x = torch.randn(tokens, dim, generator=gen).to(dtype)
    w_in = torch.randn(experts, 2 * ffn, dim, generator=gen).to(dtype)
    w_out = torch.randn(experts, dim, ffn, generator=gen).to(dtype)
    idx = _routing(tokens, k, experts, gen, pad)
    weights = torch.rand(tokens, k, generator=gen).to(weights_dtype or dtype)
    expected = experts_output_reference(x, idx, weights, w_in, w_out, F.silu)
    assert torch.equal(_batched(x, idx, weights, w_in, w_out), expected)


def test_zero_token_experts_and_all_padding():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, generator=gen)
    w_in, w_out = torch.randn(6, 10, 8, generator=gen), torch.randn(6, 8, 5, generator=gen)
    idx = torch.tensor([[0, 5], [5, 0], [0, 5], [5, 0]])  # experts 1-4 get no token
    weights = torch.rand(4, 2, generator=gen)
    plan = plan_routing(idx.reshape(-1).tolist(), 2, 6)
    assert plan.counts_E == [4, 0, 0, 0, 0, 4] and plan.needed() == [0, 5] and not plan.needs_zero_row
    assert torch.equal(_batched(x, idx, weights, w_in, w_out),
                       experts_output_reference(x, idx, weights, w_in, w_out, F.silu))
    pad = torch.full((4, 2), -1)
    plan = plan_routing(pad.reshape(-1).tolist(), 2, 6)
    assert plan.num_assignments == 0 and plan.needs_zero_row and plan.needed() == []
    assert torch.equal(_batched(x, pad, weights, w_in, w_out), torch.zeros_like(x))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.data())
def test_plan_invariants_and_both_paths_agree(k, tokens, data):
    experts = data.draw(st.integers(1, 9))
    ids = data.draw(st.lists(st.integers(-1, experts), min_size=tokens * k, max_size=tokens * k))
    a, b = _plan_python(ids, k, experts), _plan_numpy(torch.tensor(ids).numpy(), k, experts)
    assert a.counts_E == b.counts_E and a.starts_E1 == b.starts_E1 and torch.equal(a.index, b.index)
    assert a.needs_zero_row == b.needs_zero_row
    valid = [(p, e) for p, e in enumerate(ids) if 0 <= e < experts]
    assert a.counts_E == [sum(e == j for _, e in valid) for j in range(experts)]
    flat = a.flat_N.tolist()
    assert flat == [p for p, _ in sorted(valid, key=lambda pe: pe[1])]  # stable sort by expert
    assert a.tok_N.tolist() == [p // k for p in flat]
    comb = a.comb_KT.tolist()
    for t in range(tokens):  # token t's rows, ascending expert, then the zero row
        mine = sorted((e, p) for p, e in valid if p // k == t)
        rows = [flat.index(p) for _, p in mine]
        assert [comb[j][t] for j in range(k)] == rows + [len(flat)] * (k - len(rows))


def test_large_inputs_take_the_numpy_path_with_the_same_plan():
    gen = torch.Generator().manual_seed(0)
    idx = _routing(SMALL, 2, 16, gen, pad=0.1).reshape(-1)  # 2 * SMALL assignments
    a = plan_routing(idx.tolist(), 2, 16)
    b = _plan_python(idx.tolist(), 2, 16)
    assert a.counts_E == b.counts_E and torch.equal(a.index, b.index)


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="top_k"):
        plan_routing([0, 1], 0, 4)
    with pytest.raises(ValueError, match="flat_indices"):
        plan_routing([0, 1, 2], 2, 4)


@pytest.mark.parametrize("max_chunks", [None, 3])
def test_merged_copies_move_the_same_bytes_as_chunked_ones(max_chunks):
    gen = torch.Generator().manual_seed(1)
    host_in = [torch.randn(3, 12, 8, generator=gen)]
    host_out = [torch.randn(3, 8, 6, generator=gen)]
    results = []
    for merged in (False, True):
        slot_in, slot_out = torch.zeros(2, 12, 8), torch.zeros(2, 8, 6)
        copier = ChunkedCopier(host_in, host_out, slot_in, slot_out, torch.device("cpu"), chunk_bytes=96)
        assert copier.num_chunks > 4
        copier.assign(1)
        first = copier.issue((0, 2), 1, max_chunks=2)  # a partial prefetch, then the rest on demand
        rest = copier.issue((0, 2), 1, max_chunks=max_chunks, merged=merged)
        results.append((first, rest, copier.progress[1], copier.chunks_issued, slot_in.clone(), slot_out.clone()))
    (f0, r0, p0, c0, i0, o0), (f1, r1, p1, c1, i1, o1) = results
    assert (f0, r0, p0, c0) == (f1, r1, p1, c1)
    assert torch.equal(i0, i1) and torch.equal(o0, o1)
    if max_chunks is None:
        assert torch.equal(i1[1], host_in[0][2]) and torch.equal(o1[1], host_out[0][2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tokens,k,experts", [(1, 2, 8), (8, 2, 8), (8, 8, 64), (32, 2, 8)])
def test_batched_compute_is_bit_identical_on_the_gpu(tokens, k, experts):
    gen = torch.Generator().manual_seed(tokens + k)
    dim, ffn = 256, 384
    x = torch.randn(tokens, dim, generator=gen).to(torch.bfloat16).cuda()
    w_in = torch.randn(experts, 2 * ffn, dim, generator=gen).div(16).to(torch.bfloat16).cuda()
    w_out = torch.randn(experts, dim, ffn, generator=gen).div(16).to(torch.bfloat16).cuda()
    idx = _routing(tokens, k, experts, gen).cuda()
    weights = torch.rand(tokens, k, generator=gen).to(torch.bfloat16).cuda()
    plan = plan_routing(idx.reshape(-1).tolist(), k, experts)
    n, index = plan.num_assignments, plan.index.cuda()
    x_ND = x.index_select(0, index[:n])
    w_N1 = weights.reshape(-1).index_select(0, index[n:2 * n]).unsqueeze(1)
    y = torch.empty((n + 1, dim), dtype=x.dtype, device="cuda")
    for e in plan.needed():
        s, t = plan.starts_E1[e], plan.starts_E1[e + 1]
        write_expert_rows(y[s:t], x_ND[s:t], w_N1[s:t], w_in[e], w_out[e], F.silu)
    out = combine_in_expert_order(y, index[2 * n:].view(k, tokens), tokens)
    assert torch.equal(out, experts_output_reference(x, idx, weights, w_in, w_out, F.silu))
