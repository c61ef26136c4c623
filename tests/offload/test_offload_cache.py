"""ExpertCache: LRU / LFU victims, protection, invariants (hypothesis)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.offload import ExpertCache, TransferCosts, parse_bytes


def test_lru_evicts_least_recently_used():
    cache = ExpertCache(2, "lru")
    assert cache.insert((0, 1)) == (0, None)
    assert cache.insert((0, 2)) == (1, None)
    cache.use((0, 1))
    assert cache.insert((1, 0)) == (1, (0, 2))  # (0, 2) is older than the reused (0, 1)
    assert cache.lookup((0, 2)) is None and cache.lookup((1, 0)) == 1


def test_lfu_evicts_least_frequent_and_remembers_evicted_counts():
    cache = ExpertCache(2, "lfu")
    for key, uses in (((0, 0), 3), ((0, 1), 1)):
        cache.insert(key)
        for _ in range(uses):
            cache.use(key)
    cache.use((0, 2))
    cache.use((0, 2))
    assert cache.insert((0, 2)) == (1, (0, 1))  # (0, 1) used once
    for _ in range(5):
        cache.use((0, 1))  # popular while evicted
    assert cache.victim(0) == (0, 2)  # 2 uses < 3 uses of (0, 0)
    assert cache.insert((0, 1))[1] == (0, 2)


def test_protected_keys_are_never_victims():
    cache = ExpertCache(2, "lru")
    cache.insert((0, 0))
    cache.insert((0, 1))
    assert cache.insert((0, 2), protected={(0, 0)}) == (1, (0, 1))
    assert cache.insert((0, 3), protected={(0, 0), (0, 2)}) is None
    with pytest.raises(ValueError, match="already resident"):
        cache.insert((0, 0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="policy"):
        ExpertCache(2, "fifo")
    with pytest.raises(ValueError, match="num_slots"):
        ExpertCache(0)
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30) and parse_bytes("20GB") == 20 * 10**9
    with pytest.raises(ValueError, match="gpu_memory"):
        parse_bytes("lots")


def test_cost_model_prefers_cpu_only_when_faster():
    costs = TransferCosts(h2d_bytes_per_s=1e9, expert_bytes=10**8, cpu_s_fixed=0.05, cpu_s_per_token=0.01)
    assert costs.copy_s() == pytest.approx(0.1)
    assert costs.prefer_cpu(1, backlog_s=0.0)  # 0.06 s < 0.1 s
    assert not costs.prefer_cpu(8, backlog_s=0.0)  # 0.13 s > 0.1 s
    assert costs.prefer_cpu(8, backlog_s=0.05)  # behind a queued copy, the CPU wins
    assert not costs.prefer_cpu(8, backlog_s=0.05, cpu_backlog_s=0.03)  # unless the CPU is busy too


def test_layer_quota_makes_cyclic_scans_hit():
    # 3 layers x 2 experts needed per call, 4 slots: a global LRU never hits on this cycle
    hits = {}
    for layers in (1, 3):
        cache, hits[layers] = ExpertCache(4, "lru", num_layers=layers), 0
        for _ in range(10):
            for layer in range(3):
                need = {(layer, 0), (layer, 1)}
                for key in sorted(need):
                    cache.use(key)
                    if key in cache:
                        hits[layers] += 1
                    else:
                        cache.insert(key, need)
    assert hits[1] == 0 and hits[3] > 0
    cache = ExpertCache(4, "lru", num_layers=2)  # quota 2
    for key in ((0, 0), (0, 1), (1, 0), (1, 1)):
        cache.insert(key)
    assert cache.victim(0) == (0, 0)  # layer 0 at its quota evicts its own expert, not layer 1's
    assert cache.insert((0, 2), protected={(0, 0), (0, 1)}) is None  # no own slot free: stream


@settings(max_examples=60, deadline=None)
@given(policy=st.sampled_from(["lru", "lfu"]), slots=st.integers(1, 5), layers=st.integers(1, 3),
       ops=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 6), st.booleans()), max_size=60))
def test_cache_invariants(policy, slots, layers, ops):
    cache = ExpertCache(slots, policy, num_layers=layers)
    for layer, expert, protect_all in ops:
        key = (layer, expert)
        cache.use(key)
        if key in cache:
            continue
        protected = set(cache.resident()) if protect_all else set()
        before = set(cache.resident())
        placed = cache.insert(key, protected)
        if placed is None:
            own = {k for k in before if k[0] == layer}
            assert len(before) == slots and (before <= protected or own <= protected)
            continue
        slot, evicted = placed
        assert evicted is None or (evicted in before and evicted not in protected)
        assert (evicted is None) == (len(before) < slots)
        resident = cache.resident()
        assert len(resident) == len(set(resident)) <= slots
        assert sorted(cache.lookup(k) for k in resident) == sorted(set(cache.lookup(k) for k in resident))
        assert 0 <= slot < slots


def test_an_insert_that_is_not_a_use_becomes_the_next_lru_victim():
    cache = ExpertCache(3, "lru")
    cache.insert((0, 0))
    cache.insert((0, 1))
    cache.insert((0, 2), recent=False)  # a prefetch: not used yet
    assert cache.resident() == [(0, 2), (0, 0), (0, 1)]
    assert cache.insert((0, 3)) == (2, (0, 2))  # the unused guess goes first
    cache.insert((0, 4), protected={(0, 3)}, recent=False)
    cache.use((0, 4))  # used after all: now the most recent
    assert cache.resident()[-1] == (0, 4)
