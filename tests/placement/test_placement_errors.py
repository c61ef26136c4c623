"""Bad input raises ValueError naming the argument; plan files round-trip through JSON."""

import json

import numpy as np
import pytest
import torch

from moekit.placement import PlacementConfig, Plan, ReplanConfig, plan, predict_load, rebalance_experts


@pytest.mark.parametrize("args, match", [
    ((10, 1, 1, 4), "num_replicas: expected a multiple of num_gpus"),
    ((8, 1, 2, 3), "num_replicas"),
    ((12, 1, 4, 6), "num_gpus: expected a multiple of num_nodes"),
    ((0, 1, 1, 1), "num_replicas: expected a positive"),
    ((8, 3, 2, 4, True), "num_groups: expected a multiple of num_nodes"),
])
def test_bad_config(args, match):
    with pytest.raises(ValueError, match=match):
        PlacementConfig(*args)


def test_too_few_replicas_and_bad_groups():
    with pytest.raises(ValueError, match="num_replicas: expected at least num_experts=16"):
        plan(np.ones((1, 16)), PlacementConfig(8, 1, 1, 4))
    with pytest.raises(ValueError, match="num_groups: expected a divisor of num_experts"):
        plan(np.ones((1, 16)), PlacementConfig(16, 6, 2, 4))
    with pytest.raises(ValueError, match="num_replicas: expected at most"):
        plan(np.ones((1, 4)), PlacementConfig(8, 1, 1, 1))   # 8 slots on one GPU, 4 experts


@pytest.mark.parametrize("load, match", [
    (np.array([[1.0, -1.0, 2.0, 3.0]]), "load: expected non-negative"),
    (np.array([[1.0, np.nan, 2.0, 3.0]]), "load: expected finite"),
    (np.ones((1, 2, 4)), "load: expected shape"),
    ([["a", "b"]], "load: expected a numeric"),
])
def test_bad_load(load, match):
    with pytest.raises(ValueError, match=match):
        plan(load, PlacementConfig(4, 1, 1, 2))


def test_rebalance_experts_bad_input_and_algorithm():
    with pytest.raises(ValueError, match="weight: expected non-negative"):
        rebalance_experts(-torch.ones(2, 8), 8, 1, 1, 2)
    with pytest.raises(ValueError, match="num_replicas: expected a multiple"):
        rebalance_experts(torch.ones(2, 8), 9, 1, 1, 2)
    with pytest.raises(ValueError, match="algorithm"):
        rebalance_experts(torch.ones(2, 8), 8, 1, 1, 2, algorithm="greedy")


def test_bad_previous_and_replan_config():
    config = PlacementConfig(8, 1, 1, 2)
    with pytest.raises(ValueError, match="previous: expected shape"):
        plan(np.ones((2, 8)), config, np.zeros((2, 6), dtype=np.int64))
    with pytest.raises(ValueError, match="previous: expected every logical expert"):
        plan(np.ones((2, 8)), config, np.zeros((2, 8), dtype=np.int64))
    with pytest.raises(ValueError, match="previous: expected 2 layers"):
        plan(np.ones((2, 8)), config, np.tile(np.arange(8), (3, 1)))
    with pytest.raises(ValueError, match="move_price"):
        ReplanConfig(move_price=-1.0)
    with pytest.raises(ValueError, match="max_move_fraction"):
        ReplanConfig(max_move_fraction=2.0)
    with pytest.raises(ValueError, match="config: expected a PlacementConfig"):
        plan(np.ones((1, 8)), {"num_replicas": 8})


def test_predict_load_bad_input():
    with pytest.raises(ValueError, match="counts: expected shape"):
        predict_load(np.ones((3, 4)))
    with pytest.raises(ValueError, match="method"):
        predict_load(np.ones((3, 2, 4)), method="median")
    with pytest.raises(ValueError, match="halflife"):
        predict_load(np.ones((3, 2, 4)), halflife=0)
    with pytest.raises(ValueError, match="counts: expected non-negative"):
        predict_load(-np.ones((3, 2, 4)))


def test_plan_json_round_trip(tmp_path):
    load = np.random.default_rng(0).lognormal(size=(3, 16))
    config = PlacementConfig(24, 4, 2, 4)
    p = plan(load, config, plan(load[:, ::-1], config))
    path = tmp_path / "plan.json"
    p.save(path)
    q = Plan.load(path)
    assert torch.equal(q.phy2log, p.phy2log) and torch.equal(q.log2phy, p.log2phy)
    assert torch.equal(q.logcnt, p.logcnt) and np.allclose(q.gpu_load, p.gpu_load)
    assert (q.balancedness, q.moves, q.config, q.algorithm) == (p.balancedness, p.moves, p.config, p.algorithm)
    assert [f.name for f in tmp_path.iterdir()] == ["plan.json"]


def test_corrupt_plan_files(tmp_path):
    good = plan(np.ones((1, 8)), PlacementConfig(8, 1, 1, 2)).to_dict()
    cases = {
        "truncated.json": json.dumps(good)[:50],
        "other.json": json.dumps({"format": "something-else"}),
        "missing.json": json.dumps({k: v for k, v in good.items() if k != "phy2log"}),
        "ids.json": json.dumps({**good, "phy2log": [[0, 1, 2, 3, 4, 5, 6, 99]]}),
        "shape.json": json.dumps({**good, "phy2log": [[0, 1, 2, 3, 4, 5, 6]]}),
        "config.json": json.dumps({**good, "config": {**good["config"], "num_gpus": 3}}),
        "loads.json": json.dumps({**good, "gpu_load": [[1.0]]}),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match="plan"):
            Plan.load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        Plan.load(tmp_path / "nope.json")
