"""Movement-aware replanning, load prediction and the rolling evaluation."""

import numpy as np
import pytest

from moekit.metrics import moves
from moekit.placement import PlacementConfig, ReplanConfig, plan, predict_load, rolling_evaluation
from moekit.trace import synthetic_trace

CONFIGS = [PlacementConfig(40, 1, 1, 8), PlacementConfig(40, 4, 2, 8)]


@pytest.mark.parametrize("config", CONFIGS, ids=["global", "hierarchical"])
def test_replanning_moves_fewer_for_little_balance(config):
    tr = synthetic_trace(40, 4, 32, 4, 512, seed=0)
    old_load, new_load = tr.counts[:10].sum(axis=0), tr.counts[10:20].sum(axis=0)
    old = plan(old_load, config)
    fresh = plan(new_load, config, old, replan=None)
    assert fresh.moves == moves(old.phy2log, fresh.phy2log, config.num_gpus)
    eplb = plan(new_load, config, old, algorithm="eplb")
    aware = plan(new_load, config, old)
    assert aware.moves < 0.5 * eplb.moves
    assert aware.balancedness > eplb.balancedness - 0.05


def test_same_load_moves_nothing_and_budget_is_respected():
    config = PlacementConfig(40, 1, 1, 8)
    load = np.random.default_rng(1).lognormal(size=(3, 32))
    old = plan(load, config)
    assert plan(load, config, old).moves == 0
    shuffled = plan(load[:, ::-1].copy(), config)
    budget = plan(load, config, shuffled, replan=ReplanConfig(move_price=0.0, max_move_fraction=0.1,
                                                             anchor_slack=1.0, count_hysteresis=100.0))
    free = plan(load, config, shuffled, replan=ReplanConfig(move_price=0.0, anchor_slack=1.0,
                                                           count_hysteresis=100.0))
    assert budget.moves <= int(0.1 * 40) * 3 < free.moves
    assert budget.balancedness <= free.balancedness + 1e-12


def test_higher_price_moves_less():
    config = PlacementConfig(40, 1, 1, 8)
    tr = synthetic_trace(20, 4, 32, 4, 512, seed=2)
    old = plan(tr.counts[:10].sum(axis=0), config)
    new = tr.counts[10:].sum(axis=0)
    cheap = plan(new, config, old, replan=ReplanConfig(move_price=0.0))
    dear = plan(new, config, old, replan=ReplanConfig(move_price=0.05))
    assert dear.moves <= cheap.moves and dear.balancedness <= cheap.balancedness + 1e-12


def test_predict_load_window_and_ema():
    c = np.arange(2 * 1 * 3).reshape(2, 1, 3).astype(float)    # step 0: 0 1 2, step 1: 3 4 5
    assert predict_load(c, method="last", window=1).tolist() == [[3.0, 4.0, 5.0]]
    assert predict_load(c, method="window", window=2).tolist() == [[3.0, 5.0, 7.0]]
    ema = predict_load(c, method="ema", halflife=1.0)            # weights 1/3, 2/3
    assert np.allclose(ema, [[2.0, 3.0, 4.0]])
    assert np.allclose(predict_load(c, method="ema", halflife=1e9, window=2), [[3.0, 5.0, 7.0]])
    assert np.all(predict_load(c, risk=1.0) > ema)


def test_rolling_evaluation_scores_on_the_next_window():
    tr = synthetic_trace(30, 3, 16, 2, 256, seed=5)
    config = PlacementConfig(24, 1, 1, 4)
    res = rolling_evaluation(tr.counts, config, window=5, algorithm="eplb", predictor="last")
    assert len(res.balancedness) == 5 and res.moves[0] == 0
    # first replan: planned on window 0, scored on window 1
    p = plan(tr.counts[:5].sum(axis=0), config, algorithm="eplb")
    from moekit.metrics import balancedness

    assert res.balancedness[0] == pytest.approx(balancedness(tr.counts[5:10].sum(axis=0), p.phy2log, 4))
    oracle = rolling_evaluation(tr.counts, config, window=5, oracle=True)
    assert oracle.summary()["balancedness"] >= res.summary()["balancedness"]
    with pytest.raises(ValueError, match="window"):
        rolling_evaluation(tr.counts, config, window=20)
