"""ExpertParallelExperts(join_weight_grads=...): a non-bool is refused naming the argument; the
overlap's per-forward join exists only when it is on and a gradient is being recorded; the
option reaches the layers built by ExpertParallelMoE and parallelize. (The join's results are
checked in ep_worker's "grouped" scenario on 2 and 4 gloo ranks and on the GPUs.)"""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.experts import ExpertsConfig
from moekit.experts.join import WeightGradJoin
from moekit.parallel import ExpertParallelExperts, ExpertParallelMoE, parallelize


def test_join_option(gloo_world):
    cfg = ExpertsConfig(dim=8, ffn_dim=4, num_experts=2)
    for bad in (None, 1, "yes"):
        with pytest.raises(ValueError, match="join_weight_grads: expected True or False"):
            ExpertParallelExperts(cfg, gloo_world, overlap=True, join_weight_grads=bad)
    on = ExpertParallelExperts(cfg, gloo_world, overlap=True)
    assert on.join_weight_grads is True and isinstance(on.new_join(), WeightGradJoin)
    with torch.no_grad():
        assert on.new_join() is None
    assert ExpertParallelExperts(cfg, gloo_world, overlap=True, join_weight_grads=False).new_join() is None
    moe_cfg = moekit.MoEConfig(dim=8, ffn_dim=4, num_experts=2, top_k=1)
    assert ExpertParallelMoE(moe_cfg, gloo_world, overlap=True, join_weight_grads=False).experts.join_weight_grads \
        is False
    (layer,) = parallelize(moekit.MoE(moe_cfg), gloo_world, overlap=True, join_weight_grads=False)
    assert layer.join_weight_grads is False
