"""The exact ILP (highspy) against brute force, and the heuristic's optimality gap."""

import itertools

import numpy as np
import pytest

pytest.importorskip("highspy")

from moekit.placement import PlacementConfig, plan, solve_exact  # noqa: E402


def brute_force_max_load(w, R, P):
    """Smallest heaviest-GPU load over every duplicate-free layout (tiny cases only)."""
    E, S = w.size, R // P
    best = np.inf
    choices = list(itertools.combinations(range(E), S))
    for combo in itertools.product(choices, repeat=P):
        cnt = np.bincount(np.concatenate(combo), minlength=E)
        if cnt.min() == 0:
            continue
        per = w / cnt
        best = min(best, max(per[list(c)].sum() for c in combo))
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("E, P, R", [(4, 2, 6), (5, 3, 6), (3, 3, 6)])
def test_ilp_matches_brute_force(E, P, R, seed):
    w = np.random.default_rng(seed).lognormal(0.0, 1.0, E)
    res = solve_exact(w, PlacementConfig(R, 1, 1, P), time_limit=20)
    assert res.optimal
    assert res.max_load == pytest.approx(brute_force_max_load(w, R, P), rel=1e-6)
    assert sorted(set(res.phy2log.tolist())) == list(range(E))
    for g in range(P):
        on_gpu = res.phy2log[g * (R // P):(g + 1) * (R // P)]
        assert len(set(on_gpu.tolist())) == on_gpu.size


def test_heuristic_optimality_gap_on_small_cases():
    """moekit's plan is never better than the optimum and stays within a few percent of it."""
    gaps = []
    for seed in range(6):
        w = np.random.default_rng(100 + seed).lognormal(0.0, 1.0, 6)
        config = PlacementConfig(9, 1, 1, 3)
        res = solve_exact(w, config, time_limit=20)
        ours = plan(w, config).gpu_load.max()
        assert res.optimal and res.max_load <= ours * (1 + 1e-9)
        gaps.append(ours / res.max_load - 1)
    assert np.mean(gaps) < 0.05, gaps


def test_solve_exact_rejects_several_layers():
    with pytest.raises(ValueError, match="load: expected one layer"):
        solve_exact(np.ones((2, 4)), PlacementConfig(4, 1, 1, 2))
