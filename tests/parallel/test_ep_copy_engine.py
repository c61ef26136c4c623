"""The copy-engine transport's block bookkeeping (:mod:`moekit.parallel.copy_engine`) on CPU.

The copies themselves need CUDA peers (tests/parallel/test_ep_gpu.py runs them against the
single-GPU layer); here ``pull_plan`` is checked against an independent model of
``all_to_all_single`` with the split lists the NCCL path of the fixed-size dispatch uses, for
every rank of groups of 2-5, and the ``transport`` argument's errors are checked.
"""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.experts import ExpertsConfig
from moekit.parallel import ExpertParallelExperts
from moekit.parallel.copy_engine import block_index, pull_plan


def _all_to_all_single(inputs, splits):
    """What ``all_to_all_single`` returns on every rank: rank ``r`` gets, in rank order, the
    ``r``-th split of every rank's input (splits[q] = rank q's split list, symmetric here)."""
    world = len(inputs)
    outs = []
    for r in range(world):
        parts = []
        for q in range(world):
            start = sum(splits[q][:r])
            parts.append(inputs[q][start:start + splits[q][r]])
        outs.append(torch.cat(parts))
    return outs


def _pulled(sends, world, include_self, gather, cap):
    """Each rank's result when it copies as ``pull_plan`` says from the others' send buffers."""
    outs = []
    for r in range(world):
        plan = pull_plan(r, world, include_self, gather)
        out = torch.full((len(plan) * cap, sends[0].shape[1]), float("nan"))
        for q, source, j in plan:
            src = sends[q] if source is None else sends[q][source * cap:(source + 1) * cap]
            out[j * cap:(j + 1) * cap] = src
        outs.append(out)
    return outs


@pytest.mark.parametrize("world", [2, 3, 4, 5])
@pytest.mark.parametrize("include_self", [False, True])
def test_pull_plan_matches_the_all_to_all_of_the_fixed_dispatch(world, include_self):
    cap, dim = 3, 2
    gen = torch.Generator().manual_seed(world)
    splits = [[cap if include_self or p != q else 0 for p in range(world)] for q in range(world)]
    blocks = world if include_self else world - 1
    # gather (the dispatch): each rank's C rows to every rank, which NCCL gets as B repeats
    rows = [torch.randn(cap, dim, generator=gen) for _ in range(world)]
    want = _all_to_all_single([x.repeat(blocks, 1) for x in rows], splits)
    for got, ref in zip(_pulled(rows, world, include_self, True, cap), want):
        assert torch.equal(got, ref)
    # swap (the combine): block j of each rank's B blocks to the j-th rank
    sends = [torch.randn(blocks * cap, dim, generator=gen) for _ in range(world)]
    want = _all_to_all_single(sends, splits)
    for got, ref in zip(_pulled(sends, world, include_self, False, cap), want):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("include_self", [False, True])
def test_pull_plan_reads_from_different_peers_at_every_step(world, include_self):
    """The k-th copy of every rank reads from a different peer (a permutation of the ranks), so
    no GPU's outgoing links serve all readers at once; each rank reads each peer once."""
    plans = [pull_plan(r, world, include_self, False) for r in range(world)]
    for r, plan in enumerate(plans):
        assert sorted(q for q, _, _ in plan) == [q for q in range(world) if include_self or q != r]
    for step in range(len(plans[0])):
        assert len({plan[step][0] for plan in plans}) == world


def test_block_index_leaves_out_the_rank_itself():
    assert [block_index(p, 2, False) for p in (0, 1, 3, 4)] == [0, 1, 2, 3]
    assert [block_index(p, 2, True) for p in range(5)] == list(range(5))
    with pytest.raises(ValueError, match="peer"):
        block_index(2, 2, False)


def test_transport_errors_name_the_argument(gloo_world):
    cfg = ExpertsConfig(dim=8, ffn_dim=4, num_experts=2)
    with pytest.raises(ValueError, match="transport: expected 'all_to_all', 'copy_engine'"):
        ExpertParallelExperts(cfg, gloo_world, max_tokens_per_rank=4, transport="nvlink")
    with pytest.raises(ValueError, match="transport: .*max_tokens_per_rank"):
        ExpertParallelExperts(cfg, gloo_world, transport="copy_engine")
    with pytest.raises(ValueError, match="transport: 'copy_engine' needs an NCCL group"):
        ExpertParallelExperts(cfg, gloo_world, max_tokens_per_rank=4, transport="copy_engine")
    with pytest.raises(ValueError, match="NCCL group"):
        moekit.parallel.parallelize(moekit.MoE(moekit.MoEConfig(dim=8, ffn_dim=4, num_experts=2, top_k=1)),
                                    gloo_world, max_tokens_per_rank=4, transport="copy_engine")


class _MirrorExchange:
    """A stand-in transport for the autograd function alone: ``world`` ranks that all hold what
    this rank holds, so a gather repeats this rank's block and a swap returns its input."""

    def __init__(self, world):
        self.world = world

    def run(self, tensors, include_self, gather):
        blocks = self.world if include_self else self.world - 1
        return [t.repeat(blocks, *([1] * (t.ndim - 1))) if gather else t.clone() for t in tensors]


@pytest.mark.parametrize("include_self", [False, True])
def test_exchange_gradients_sum_the_blocks_and_skip_integer_tensors(include_self):
    from moekit.parallel.copy_engine import gather_blocks, swap_blocks

    gen = torch.Generator().manual_seed(3)
    exchange = _MirrorExchange(world=3)
    blocks = 3 if include_self else 2
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    slots = torch.randint(0, 6, (4, 2), generator=gen)
    x_QD, slot_QK, w_QK = gather_blocks(exchange, include_self, x, slots, w)
    assert torch.equal(slot_QK, slots.repeat(blocks, 1)) and not slot_QK.requires_grad
    dy = torch.randn(x_QD.shape, generator=gen, dtype=torch.float64)
    # w_QK's output is unused: its gradient arrives as None and is exchanged as zeros
    (y,) = swap_blocks(exchange, include_self, x_QD)
    dx, dw = torch.autograd.grad((y * dy).sum(), [x, w])
    # the mirror's gather is repeat and its swap the identity: the gradient is repeat's adjoint
    torch.testing.assert_close(dx, dy.view(blocks, 4, 5).sum(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(dw, torch.zeros_like(w), rtol=0, atol=0)
