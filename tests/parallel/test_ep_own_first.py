"""The layer's gather tables of the fixed-size dispatch follow its placement (the tables
themselves: test_ep_dispatch.py), and its launch-order option ``own_first`` is checked and
reaches the layers. (Its results, equal to the single-process layer in outputs and all
gradients, are checked in ep_worker's scenarios on 2 and 4 gloo ranks and on the GPUs.)"""

from __future__ import annotations

import pytest
import torch
import moekit
from moekit.experts import ExpertsConfig
from moekit.parallel import ExpertParallelExperts, ExpertParallelMoE, parallelize


def test_layer_slots_follow_a_new_placement(gloo_world):
    """The layer's tables are rebuilt by set_placement (apply_plan calls it)."""
    cfg = ExpertsConfig(dim=8, ffn_dim=4, num_experts=4)
    layer = ExpertParallelExperts(cfg, gloo_world)
    idx = torch.tensor([[0, 3], [-1, 2], [1, -1]])
    assert torch.equal(layer.physical_slots(idx), idx)
    layer.set_placement(torch.tensor([2, 0, 3, 1]))
    expect = torch.tensor([[1, 2], [-1, 0], [3, -1]])
    assert torch.equal(layer.physical_slots(idx), expect)
    assert torch.equal(layer.local_of(expect), expect)  # one rank holds every slot
    assert "slot_E1" not in layer.state_dict() and "local_R1" not in layer.state_dict()


def test_own_first_option(gloo_world):
    cfg = ExpertsConfig(dim=8, ffn_dim=4, num_experts=2)
    for bad in (None, 1, "yes"):
        with pytest.raises(ValueError, match="own_first: expected True or False"):
            ExpertParallelExperts(cfg, gloo_world, overlap=True, max_tokens_per_rank=4, own_first=bad)
    for mode in (dict(), dict(overlap=True), dict(max_tokens_per_rank=4)):
        with pytest.raises(ValueError, match="own_first: expected False unless overlap=True with max_tokens_per_rank"):
            ExpertParallelExperts(cfg, gloo_world, own_first=True, **mode)
    assert ExpertParallelExperts(cfg, gloo_world, overlap=True, max_tokens_per_rank=4).own_first is False
    moe_cfg = moekit.MoEConfig(dim=8, ffn_dim=4, num_experts=2, top_k=1)
    fixed = dict(overlap=True, max_tokens_per_rank=4, own_first=True)
    assert ExpertParallelMoE(moe_cfg, gloo_world, **fixed).experts.own_first is True
    (layer,) = parallelize(moekit.MoE(moe_cfg), gloo_world, **fixed)
    assert layer.own_first is True
