"""Staged prefetch (``staging_slots``) and two-layers-ahead prediction on a CPU "device".

A guess is copied into a staging slot outside the cache and takes a cache slot only when its
layer needs it, evicting then what a demand copy would have. So a wrong guess never evicts a
cached expert: while no layer call needs more experts than its quota of cache slots, the cache's
contents follow exactly those of the same cache without prefetch, and every staged hit comes on
top of its hits. Greedy generation stays token-identical, also
when guesses are copied only in part."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_models import FAMILY_NAMES, tiny_config, tiny_model  # noqa: E402

from moekit.offload import ExpertCache, StagingArea, offload  # noqa: E402


def test_staging_takes_empty_slots_then_the_oldest_unguarded_guess():
    area = StagingArea([7, 9])
    assert len(area) == 2 and area.slots() == {7, 9}
    assert area.take((0, 1)) == (7, None) and area.take((0, 2)) == (9, None)
    assert area.lookup((0, 1)) == 7 and (0, 2) in area
    assert area.take((1, 0), guard={(0, 1)}) == (9, (0, 2))  # (0, 1) is older but guarded
    assert area.take((1, 1), guard={(0, 1), (1, 0)}) is None  # every staged key guarded: nothing changes
    assert area.staged() == [(0, 1), (1, 0)]
    assert area.remove((0, 1)) == 7 and area.slots() == {9}  # promoted: the slot leaves staging
    area.add(3, (2, 2))  # a cache victim's slot joins, its expert kept
    area.add(4)
    assert area.slots() == {3, 4, 9} and area.lookup((2, 2)) == 3
    assert area.take((1, 2)) == (4, None)  # an empty slot before any staged expert


def test_staging_rejects_bad_use():
    with pytest.raises(ValueError, match="slots"):
        StagingArea([])
    with pytest.raises(ValueError, match="slots"):
        StagingArea([1, 1])
    area = StagingArea([0])
    area.take((0, 0))
    with pytest.raises(ValueError, match="already staged"):
        area.take((0, 0))
    with pytest.raises(ValueError, match="not staged"):
        area.remove((0, 1))
    with pytest.raises(ValueError, match="already a staging slot"):
        area.add(0)


def test_cache_exchange_evicts_what_insert_would_and_hands_its_slot_out():
    plain, swapped = ExpertCache(2, "lru"), ExpertCache(2, "lru")
    for cache in (plain, swapped):
        cache.insert((0, 0))
        cache.insert((0, 1))
        cache.use((0, 0))
    assert plain.insert((0, 2)) == (1, (0, 1))
    assert swapped.exchange((0, 2), 5) == (1, (0, 1))  # same victim; slot 1 leaves, slot 5 joins
    assert swapped.lookup((0, 2)) == 5 and swapped.resident() == plain.resident()
    assert swapped.exchange((0, 3), 6, protected={(0, 0), (0, 2)}) is None  # nothing may go: unchanged
    assert swapped.resident() == [(0, 0), (0, 2)]
    with pytest.raises(ValueError, match="already belongs"):
        swapped.exchange((0, 4), 0)
    with pytest.raises(ValueError, match="already resident"):
        swapped.exchange((0, 2), 8)
    fresh = ExpertCache(3, "lru")
    assert fresh.exchange((0, 0), 9) == (0, None)  # a free slot leaves in exchange


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.booleans()), min_size=1, max_size=40))
def test_exchange_keeps_slots_disjoint_and_contents_as_insert(ops):
    # the same use sequence through insert (plain) and through exchange from a staging pool
    plain, cache = ExpertCache(4, "lru", num_layers=3), ExpertCache(4, "lru", num_layers=3)
    area = StagingArea([4, 5])
    for layer, expert, _ in ops:
        key = (layer, expert)
        for c in (plain, cache):
            c.use(key)
        if key in plain:
            continue
        plain.insert(key)
        if key not in area:
            placed = area.take(key)
            assert placed is not None
        slot = area.remove(key)
        left, evicted = cache.exchange(key, slot)
        area.add(left, evicted)
        assert set(cache.resident()) == set(plain.resident())
        cache_slots = {cache.lookup(k) for k in cache.resident()}
        assert not cache_slots & area.slots() and len(cache_slots | area.slots()) == len(cache) + len(area)
        assert not set(area.staged()) & set(cache.resident())


def _run(family="mixtral", prefetch="layer_output", staging=2, slots=4, seed=70, lead=1, landed=None,
         prompt=5, model=None):
    """Greedy generation of an offloaded tiny model; returns (tokens, reference tokens, handle,
    the cache's resident keys, least recent first, whenever a layer call looks its experts up)."""
    model = model if model is not None else tiny_model(family, seed=seed)
    ref = copy.deepcopy(model)
    handle = offload(model, cache_experts=slots, device="cpu", prefetch=prefetch, staging_slots=staging,
                     lead_chunks=lead, chunk_bytes=1024)
    engine = handle.engine
    if landed is not None:
        engine.copy_landed = landed(engine)
    trail = []
    to_host = engine._to_host

    def record(*args):  # the cache's contents when a layer looks its experts up
        out = to_host(*args)
        trail.append(engine.cache.resident())
        return out

    engine._to_host = record
    ids = torch.randint(3, 96, (1, prompt), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=12, do_sample=False)
        expected = ref.generate(ids, max_new_tokens=12, do_sample=False)
    return got, expected, handle, trail


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("prefetch,lead", [("layer_output", 1), ("layer_output2", 10**6), ("next_layer", 1)])
def test_staged_prefetch_is_token_identical_and_never_evicts_for_a_guess(family, prefetch, lead):
    # a one-token prompt: no layer call needs more experts than its quota of cache slots (where
    # one does, a staged expert that may not enter the cache yet is read in its staging slot)
    got, expected, handle, trail = _run(family, prefetch, lead=lead, prompt=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    _, _, plain, plain_trail = _run(family, "none", staging=0, prompt=1)
    # whenever a layer looks its experts up, the cache holds exactly what the same cache without
    # prefetch holds, in the same order (without staging, guesses take its slots: not so)
    assert trail == plain_trail
    c, p = handle.engine.counters, plain.engine.counters
    assert c.activations == p.activations and c.prefetch_copies > 0
    assert c.hits - c.staged_hits == p.hits  # the cache's own hits unchanged; staged hits come on top
    assert c.hits >= p.hits and c.h2d_bytes - c.prefetch_bytes <= p.h2d_bytes


def test_staged_accounting_adds_up():
    got, expected, handle, _ = _run("olmoe", "layer_output", staging=1, lead=10**6, seed=80)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    c, s = handle.engine.counters, handle.stats()
    misses = c.activations - c.hits - c.inflight_hits
    assert c.demand_copies == misses  # every miss (staged ones included) copied once, in part or in full
    assert c.prefetch_useful == c.staged_hits - c.victim_hits  # guesses live in staging until used
    assert c.prefetch_useful > 0 and c.staged_dropped > 0  # some guesses right, some overwritten unused
    used = c.prefetch_useful + c.staged_inflight_hits + c.staged_misses
    assert used + c.staged_dropped <= c.prefetch_copies
    assert s["staging_slots"] == 1 and s["staged_hits"] == c.staged_hits and s["victim_hits"] == c.victim_hits


def test_partly_copied_guesses_are_staged_misses_and_complete_on_demand():
    got, expected, handle, _ = _run("mixtral", "layer_output", staging=2, lead=1, seed=74)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    c = handle.engine.counters
    assert c.staged_misses > 0 and c.demand_copies == c.activations - c.hits - c.inflight_hits


def test_staged_copies_still_running_are_inflight_hits_only_in_staging():
    # copies into staging slots look unfinished, cache slots finished: staged hits move to in flight
    _, _, landed, _ = _run("olmoe", "layer_output", staging=3, lead=10**6, seed=72)
    _, _, late, _ = _run("olmoe", "layer_output", staging=3, lead=10**6, seed=72,
                         landed=lambda engine: (lambda slot: slot not in engine.staging.slots()))
    a, b = landed.engine.counters, late.engine.counters
    assert b.staged_hits == 0 and b.staged_inflight_hits == a.staged_hits > 0
    assert b.hits == a.hits - a.staged_hits and b.inflight_hits == a.staged_hits
    assert b.demand_copies == a.demand_copies and b.h2d_bytes == a.h2d_bytes


def _three_layer_mixtral(seed):
    import transformers as T

    config = tiny_config("mixtral")
    config.num_hidden_layers = 3
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(config).eval()


def test_two_layers_ahead_queues_both_layers_and_is_exact_when_the_middle_adds_nothing():
    model = _three_layer_mixtral(76)
    with torch.no_grad():  # the residual stream reaching layers 1 and 2 = decoder layer 0's output
        for layer in model.model.layers[1:]:
            layer.self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.experts.down_proj.zero_()
    handle = offload(model, cache_experts=6, device="cpu", prefetch="layer_output2", staging_slots=2)
    engine = handle.engine
    assert [p is not None and len(p) for p in engine.out_predictors] == [2, 1, False]
    targets = []
    set_prefetch = engine._set_prefetch

    def spy(found, protected):
        targets.append([layer for layer, *_ in found])
        return set_prefetch(found, protected)

    engine._set_prefetch = spy
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(77))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=6, do_sample=False)
    assert [1, 2] in targets and [2] in targets
    s = handle.stats()
    assert s["prefetch_precision"] == 1.0 and s["prefetch_recall"] == 1.0


def test_staging_slots_come_from_the_gpu_memory_budget_and_bad_values_are_rejected():
    model = tiny_model("mixtral", seed=78)
    handle = offload(copy.deepcopy(model), cache_experts=3, device="cpu", staging_slots=2)
    eb = handle.engine.expert_bytes
    assert handle.num_slots == 3 and handle.engine.slot_in.shape[0] == 5
    budget = handle.dense_bytes + 6 * eb + 1000
    assert offload(copy.deepcopy(model), gpu_memory=budget, reserve=1000, device="cpu").num_slots == 6
    staged = offload(copy.deepcopy(model), gpu_memory=budget, reserve=1000, device="cpu", staging_slots=2)
    assert staged.num_slots == 4 and staged.engine.slot_in.shape[0] == 6
    with pytest.raises(ValueError, match="staging_slots"):
        offload(copy.deepcopy(model), cache_experts=2, device="cpu", staging_slots=-1)
    with pytest.raises(ValueError, match="gpu_memory"):
        offload(copy.deepcopy(model), gpu_memory=budget, reserve=1000, device="cpu", staging_slots=6)
    handle.reconfigure(staging_slots=0, prefetch="layer_output2")
    assert handle.engine.staging is None and handle.stats()["staging_slots"] == 0
