"""The vectorised EPLB rewrite and packing helpers against slow, obviously-correct loops.

The references below follow EPLB's published description step by step, one layer at a time,
with plain Python lists (nothing here is EPLB's code).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.placement import PlacementConfig
from moekit.placement.eplb import eplb_placement
from moekit.placement.packing import lpt_pack
from moekit.placement.replication import greedy_counts, sticky_counts


def ref_balanced_packing(weights, num_packs):
    """Heaviest first (stable), into the lightest pack with room (lowest index on ties)."""
    cap = len(weights) // num_packs
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    loads, members = [0.0] * num_packs, [[] for _ in range(num_packs)]
    pack_of, rank_of = [0] * len(weights), [0] * len(weights)
    for i in order:
        p = min((p for p in range(num_packs) if len(members[p]) < cap), key=lambda p: (loads[p], p))
        pack_of[i], rank_of[i] = p, len(members[p])
        members[p].append(i)
        loads[p] += weights[i]
    return pack_of, rank_of


def ref_replicate(weights, num_slots):
    cnt = [1] * len(weights)
    phy = list(range(len(weights)))
    for _ in range(num_slots - len(weights)):
        best = max(range(len(weights)), key=lambda e: (weights[e] / cnt[e], -e))
        phy.append(best)
        cnt[best] += 1
    return phy, cnt


def ref_eplb_layer(w, R, G, N, P):
    """One layer of EPLB's hierarchical policy (global = G = N = 1)."""
    E = len(w)
    gsize, gpn, spn = E // G, P // N, R // N
    group_w = [sum(w[g * gsize:(g + 1) * gsize]) for g in range(G)]
    gpack, grank = ref_balanced_packing(group_w, N)
    node_experts = [[] for _ in range(N)]
    for g in sorted(range(G), key=lambda g: (gpack[g], grank[g])):
        node_experts[gpack[g]].extend(range(g * gsize, (g + 1) * gsize))
    layout = [None] * R
    for n in range(N):
        local_w = [w[e] for e in node_experts[n]]
        phy, cnt = ref_replicate(local_w, spn)
        per_replica = [local_w[x] / cnt[x] for x in phy]
        pack, rank = ref_balanced_packing(per_replica, gpn)
        for j, x in enumerate(phy):
            layout[n * spn + pack[j] * (spn // gpn) + rank[j]] = node_experts[n][x]
    return layout


@st.composite
def eplb_cases(draw):
    N = draw(st.sampled_from([1, 2]))
    G = N * draw(st.integers(1, 2))
    E = G * draw(st.integers(1, 3))
    P = N * draw(st.integers(1, 3))
    R = P * draw(st.integers(-(-E // P), -(-E // P) + 2))
    L = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31))
    # distinct weights: ties are broken differently by different correct implementations
    w = np.random.default_rng(seed).permutation(L * E).reshape(L, E) + np.random.default_rng(seed).random((L, E))
    return w.astype(np.float64), R, G, N, P


@settings(max_examples=80, deadline=None)
@given(eplb_cases())
def test_eplb_rewrite_matches_reference_loops(case):
    w, R, G, N, P = case
    config = PlacementConfig(R, G, N, P)
    phy2log, _ = eplb_placement(w, config)
    for layer in range(w.shape[0]):
        if config.hierarchical:
            ref = ref_eplb_layer(list(w[layer]), R, G, N, P)
        else:
            ref = ref_eplb_layer(list(w[layer]), R, 1, 1, P)
        assert phy2log[layer].tolist() == ref


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**31))
def test_lpt_pack_matches_reference(rows, packs, cap, seed):
    w = np.random.default_rng(seed).random((rows, packs * cap))
    pack, rank = lpt_pack(w, packs)
    for b in range(rows):
        ref_pack, ref_rank = ref_balanced_packing(list(w[b]), packs)
        assert pack[b].tolist() == ref_pack and rank[b].tolist() == ref_rank


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 5), st.integers(0, 4), st.integers(0, 2**31))
def test_greedy_counts_minimise_largest_replica_load(num_exp, extra, seed):
    """Exact: no other count vector (brute force) has a smaller max w / c."""
    import itertools

    w = np.random.default_rng(seed).random(num_exp) + 0.01
    cnt = greedy_counts(w[None], num_exp + extra)[0]
    assert cnt.sum() == num_exp + extra and cnt.min() >= 1
    best = min(
        max(w / (1 + np.array(add)))
        for add in itertools.product(range(extra + 1), repeat=num_exp) if sum(add) == extra
    )
    assert (w / cnt).max() == pytest.approx(best)


def test_sticky_counts_keeps_old_counts_until_it_pays():
    w = np.array([[10.0, 5.0, 5.0, 1.0]])
    old = np.array([[2, 1, 1, 2]])                       # expert 3 holds a useless replica
    assert sticky_counts(w, old, 4, hysteresis=0.0).tolist() == greedy_counts(w, 6, 4).tolist()
    assert sticky_counts(w, old, 4, hysteresis=100.0).tolist() == old.tolist()
