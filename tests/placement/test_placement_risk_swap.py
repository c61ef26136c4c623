"""Risk-aware swap search (``swap_search(..., var_BN=..., risk=...)``): a property test."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit.placement.packing import swap_search


def _score(item_BPS, w_BN, v_BN, risk):
    rows = np.arange(item_BPS.shape[0])[:, None, None]
    return (w_BN[rows, item_BPS].sum(axis=2) + risk * np.sqrt(v_BN[rows, item_BPS].sum(axis=2))).max(axis=1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 3), packs=st.integers(2, 5), cap=st.integers(1, 4), risk=st.sampled_from([0.5, 2.0]),
       seed=st.integers(0, 2**32 - 1))
def test_risk_swaps_lower_the_highest_score_and_keep_keys_apart(rows, packs, cap, risk, seed):
    rng = np.random.default_rng(seed)
    n = packs * cap
    num_keys = n                                  # every key at most ``packs`` times: valid start exists
    keys = np.stack([np.sort(rng.integers(0, num_keys, n)) for _ in range(rows)])
    w = rng.lognormal(0.0, 1.0, (rows, n))
    v = (0.3 * w) ** 2 * rng.uniform(0.1, 3.0, (rows, n))
    # a start without two equal keys in one pack: round robin over the key-sorted items
    start = np.broadcast_to(np.arange(n).reshape(cap, packs).T, (rows, packs, cap)).copy()
    dup = lambda it: [len(set(keys[b, it[b, p]])) < cap for b in range(rows) for p in range(packs)]  # noqa: E731
    if any(dup(start)):
        return                                    # a key repeated more than ``packs`` times
    plain = swap_search(start, w, keys, num_keys)
    risky = swap_search(start, w, keys, num_keys, var_BN=v, risk=risk)
    for out in (plain, risky):
        assert np.array_equal(np.sort(out.reshape(rows, -1), axis=1), np.broadcast_to(np.arange(n), (rows, n)))
        assert not any(dup(out))
    before = _score(start, w, v, risk)
    after = _score(risky, w, v, risk)
    assert np.all(after <= before + 1e-9 * before)
    # risk 0 (or no variances) is the plain load search, bit for bit
    assert np.array_equal(swap_search(start, w, keys, num_keys, var_BN=v, risk=0.0), plain)


def test_risk_spreads_volatile_items():
    # two packs, four items of equal mean load; two are volatile: the plain search sees a
    # balanced layout, the risk-aware one puts the volatile items on different packs
    w = np.ones((1, 4))
    v = np.array([[4.0, 4.0, 0.0, 0.0]])
    start = np.array([[[0, 1], [2, 3]]])          # both volatile items on pack 0
    assert np.array_equal(swap_search(start, w), start)
    out = swap_search(start, w, var_BN=v, risk=1.0)
    assert sorted(int((out[0, p] < 2).sum()) for p in range(2)) == [1, 1]
