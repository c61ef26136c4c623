"""Property tests: every plan is a valid placement, in EPLB's output format."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit.metrics import balancedness
from moekit.placement import PlacementConfig, ReplanConfig, plan, rebalance_experts

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def instances(draw, hierarchical=None):
    """(load [L, E], config) with a duplicate-free placement possible (R / P <= E / N)."""
    nodes = draw(st.sampled_from([1, 2])) if hierarchical is not False else 1
    gpus_per_node = draw(st.integers(1, 3))
    gpus = nodes * gpus_per_node
    groups = nodes * draw(st.integers(1, 2))
    experts = groups * draw(st.integers(1, 3))
    if hierarchical is False:
        groups = 1
    slots = draw(st.integers(1, max(1, min(4, experts // nodes))))
    replicas = gpus * slots
    if replicas < experts:
        replicas = gpus * -(-experts // gpus)
        slots = replicas // gpus
    if slots > experts // nodes:
        nodes, groups = 1, 1
        gpus_per_node = gpus
    layers = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["lognormal", "integers", "sparse"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "lognormal":
        load = rng.lognormal(0.0, 1.5, size=(layers, experts))
    elif kind == "integers":
        load = rng.integers(0, 50, size=(layers, experts)).astype(np.float64)
    else:
        load = rng.lognormal(0.0, 1.0, size=(layers, experts)) * (rng.random((layers, experts)) < 0.3)
    return load, PlacementConfig(replicas, groups, nodes, gpus)


def check_valid(phy2log, log2phy, logcnt, num_experts, config, allow_duplicates=False):
    p2l = phy2log.numpy()
    l2p = log2phy.numpy()
    cnt = logcnt.numpy()
    num_layers, num_slots = p2l.shape
    assert num_slots == config.num_replicas
    assert l2p.shape == (num_layers, num_experts, num_slots - num_experts + 1)
    assert cnt.shape == (num_layers, num_experts)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert np.all(cnt >= 1), "every expert has a replica"
    assert np.all(cnt.sum(axis=1) == num_slots), "logcnt sums to R"
    slots = config.slots_per_gpu
    for layer in range(num_layers):
        # phy2log and log2phy agree, both ways
        for e in range(num_experts):
            listed = l2p[layer, e]
            assert np.all(listed[: cnt[layer, e]] >= 0) and np.all(listed[cnt[layer, e]:] == -1)
            assert np.all(p2l[layer, listed[: cnt[layer, e]]] == e)
        assert sorted(np.concatenate([l2p[layer, e, : cnt[layer, e]] for e in range(num_experts)])) == list(range(num_slots))
        for g in range(config.num_gpus):
            on_gpu = p2l[layer, g * slots:(g + 1) * slots]
            assert on_gpu.size == slots
            if not allow_duplicates:
                assert len(set(on_gpu.tolist())) == slots, "no GPU holds two replicas of one expert"


@SETTINGS
@given(instances())
def test_plan_is_valid(inst):
    load, config = inst
    p = plan(load, config)
    check_valid(p.phy2log, p.log2phy, p.logcnt, load.shape[1], config)
    if config.hierarchical:
        assert p.nodes_per_group == 1.0, "groups stay on their node"
    assert p.balancedness == pytest.approx(balancedness(load, p.phy2log, config.num_gpus))


@SETTINGS
@given(instances(), st.integers(0, 2**32 - 1))
def test_replan_is_valid(inst, seed):
    load, config = inst
    old = plan(np.random.default_rng(seed).permutation(load, axis=1), config)
    for replan in (ReplanConfig(), ReplanConfig(move_price=0.0, anchor_slack=0.0, count_hysteresis=0.0),
                   ReplanConfig(max_move_fraction=0.25)):
        p = plan(load, config, old, replan=replan)
        check_valid(p.phy2log, p.log2phy, p.logcnt, load.shape[1], config)
        assert p.moves is not None and p.moves >= 0


@SETTINGS
@given(instances())
def test_rebalance_experts_matches_eplb_format(inst):
    load, config = inst
    args = (torch.from_numpy(load), config.num_replicas, config.num_groups, config.num_nodes, config.num_gpus)
    ours = rebalance_experts(*args)
    ref = rebalance_experts(*args, algorithm="eplb")
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
    check_valid(*ours, load.shape[1], config)
    check_valid(*ref, load.shape[1], config, allow_duplicates=True)


@SETTINGS
@given(instances())
def test_plan_at_least_as_balanced_as_eplb(inst):
    """Whenever EPLB's plan is one moekit may output (no GPU with two replicas of an expert).

    A duplicate can score better under the even-split metric (it behaves like one replica
    with twice the share and a wasted slot); moekit never emits one, so those cases compare
    against a plan outside its constraints and are only checked to be valid.
    """
    load, config = inst
    ours = plan(load, config)
    ref = plan(load, config, algorithm="eplb")
    p2l = ref.phy2log.numpy().reshape(load.shape[0], config.num_gpus, -1)
    duplicate_free = all(len(set(gpu.tolist())) == gpu.size for layer in p2l for gpu in layer)
    if duplicate_free:
        assert ours.balancedness >= ref.balancedness - 1e-9


def test_eplb_can_put_two_replicas_on_one_gpu_moekit_never():
    # one very hot expert, 2 GPUs with 3 slots: EPLB's greedy gives it 3 replicas -> a GPU gets two
    load = np.array([[100.0, 1.0, 1.0, 1.0]])
    config = PlacementConfig(6, 1, 1, 2)
    ref = plan(load, config, algorithm="eplb").phy2log.numpy()[0]
    assert len(set(ref[:3].tolist())) < 3 or len(set(ref[3:].tolist())) < 3
    ours = plan(load, config).phy2log.numpy()[0]
    assert len(set(ours[:3].tolist())) == 3 and len(set(ours[3:].tolist())) == 3


def test_zero_load_and_single_gpu():
    config = PlacementConfig(8, 1, 1, 1)
    p = plan(np.zeros((2, 8)), config)
    assert p.balancedness == 1.0
    check_valid(p.phy2log, p.log2phy, p.logcnt, 8, config)


def test_rebalance_keeps_device_and_accepts_1d_rows():
    w = torch.rand(3, 16)
    phy2log, log2phy, logcnt = rebalance_experts(w, 20, 4, 2, 4)
    assert phy2log.shape == (3, 20) and log2phy.shape == (3, 16, 5) and logcnt.shape == (3, 16)
    assert phy2log.device == w.device


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31))
def test_round_robin_fallback_is_always_valid(rows, packs, slots, seed):
    """The layout used where LPT gets stuck: exact counts, never two replicas in one pack."""
    from moekit.placement.planner import _round_robin

    rng = np.random.default_rng(seed)
    experts = max(slots, rng.integers(slots, packs * slots + 1))
    cnt = np.ones((rows, experts), dtype=np.int64)
    for b in range(rows):            # random extra replicas, at most one per pack each
        for _ in range(packs * slots - experts):
            free = np.flatnonzero(cnt[b] < packs)
            cnt[b, rng.choice(free)] += 1
    keys = _round_robin(cnt, rng.random((rows, experts)), packs)
    assert keys.shape == (rows, packs, slots)
    for b in range(rows):
        assert np.array_equal(np.bincount(keys[b].ravel(), minlength=experts), cnt[b])
        for p in range(packs):
            assert len(set(keys[b, p].tolist())) == slots
