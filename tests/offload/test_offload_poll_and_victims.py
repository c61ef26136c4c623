"""Session-4 engine behaviour on a CPU "device": a ``layer_output`` prediction starts its
prefetch at the first poll between the host's launches (not only while the host waits for the
next layer's counts); a prefetch evicts the resident expert its prediction deems least likely;
misses that must stream through the slots count as copy work when CPU computation is weighed;
CPU-computed experts are summed in ascending expert order after the device work is queued."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_models import tiny_model  # noqa: E402

from moekit.offload import ExpertCache, TransferCosts, offload  # noqa: E402


def test_victim_by_scores_takes_the_lowest_scored_candidate_ties_by_policy():
    cache = ExpertCache(3, "lru")
    for e in range(3):
        cache.insert((0, e))
    scores = {(0, 0): 0.9, (0, 1): 0.1, (0, 2): 0.5}
    assert cache.victim(0) == (0, 0)  # plain LRU
    assert cache.victim(0, scores=scores) == (0, 1)
    assert cache.victim(0, protected={(0, 1)}, scores=scores) == (0, 2)
    assert cache.victim(0, scores={(0, 0): 0.2, (0, 1): 0.2, (0, 2): 0.9}) == (0, 0)  # tie: least recent
    lfu = ExpertCache(2, "lfu")
    for key, uses in (((0, 0), 3), ((0, 1), 1)):
        lfu.insert(key)
        for _ in range(uses):
            lfu.use(key)
    assert lfu.victim(0, scores={(0, 0): 0.3, (0, 1): 0.3}) == (0, 1)  # tie: least frequent
    assert lfu.insert((0, 2), scores={(0, 0): 0.1, (0, 1): 0.3}) == (0, (0, 0))


def _offloaded(prefetch="layer_output", seed=50, slots=5):
    model = tiny_model("mixtral", seed=seed)
    return model, offload(model, cache_experts=slots, device="cpu", prefetch=prefetch, lead_chunks=1,
                          chunk_bytes=1024)


def test_poll_starts_an_arrived_prediction_before_the_layer_waits_for_its_counts():
    model, handle = _offloaded()
    engine = handle.engine
    seen = []  # (pending prediction left, prefetch copies) when MoE layer 1 starts
    forward = engine.forward

    def spy(layer, *args):
        if layer == 1:
            seen.append((engine._pending is not None, engine.counters.prefetch_copies))
        return forward(layer, *args)

    engine.forward = spy
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(51))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=6, do_sample=False)
    # the decoder layer's modules polled before MoE layer 1 ran: nothing was left unread
    assert seen and not any(pending for pending, _ in seen)
    assert engine.counters.prefetch_copies > 0 and engine.counters.prefetch_leads > 0


def test_without_poll_the_prediction_waits_for_the_counts_and_tokens_do_not_change():
    model, handle = _offloaded(seed=52)
    ref_model, ref_handle = _offloaded(seed=52)
    ref_handle.engine.poll = lambda: None  # the third session's engine: read only while waiting
    pending_at_layer = []
    forward = ref_handle.engine.forward
    ref_handle.engine.forward = lambda layer, *a: (pending_at_layer.append(ref_handle.engine._pending is not None),
                                                   forward(layer, *a))[1]
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(53))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        ref = ref_model.generate(ids, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert any(pending_at_layer)  # predictions were still unread when their layer started


def test_prefetch_evicts_the_resident_expert_with_the_lowest_predicted_mass():
    model, handle = _offloaded(seed=54, slots=4)  # 2 layers x 2 slots, 4 experts each
    engine = handle.engine
    assert engine.num_experts == 4
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(55))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
    resident = [k for k in engine.cache.resident() if k[0] == 1]
    assert len(resident) == 2
    missing = [e for e in range(engine.num_experts) if (1, e) not in engine.cache]
    guess = missing[0]
    mass = [0.5] * engine.num_experts
    lowest = resident[-1]  # the most recently used one: LRU would keep it
    mass[lowest[1]] = 0.01
    counts = [0.0] * engine.num_experts
    counts[guess] = 1.0
    engine._set_prefetch(1, counts, mass, set())
    assert (1, guess) in engine.cache and lowest not in engine.cache
    assert all(k in engine.cache for k in resident if k != lowest)


def test_streamed_misses_count_as_copy_work_so_the_cpu_takes_some():
    # one slot per layer and 4 tokens on 6 experts: most misses find every slot protected and
    # stream later; CPU 3.5 s vs copy 1 s per expert: the CPU wins only once three copies are
    # queued, which it can see only if the streamed misses count in the copy backlog
    model = tiny_model("olmoe", seed=56)
    ref = copy.deepcopy(model)
    ids = torch.randint(3, 96, (4, 4), generator=torch.Generator().manual_seed(57))
    handle = offload(model, cache_experts=2, device="cpu", cpu_compute=True)
    eb = handle.engine.expert_bytes
    handle.engine.costs = TransferCosts(h2d_bytes_per_s=float(eb), expert_bytes=eb, cpu_s_fixed=3.5, cpu_s_per_token=0.0)
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=4, do_sample=False)
        expected = ref.generate(ids, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # same fp32 arithmetic, same order of sums
    c = handle.engine.counters
    assert c.cpu_computed > 0 and c.demand_copies > 0
    assert c.cpu_computed + c.demand_copies >= c.activations - c.hits


@pytest.mark.parametrize("prefetch", ["none", "layer_output"])
def test_cpu_computed_experts_keep_greedy_tokens_with_mixtral(prefetch):
    model = tiny_model("mixtral", seed=58)
    ref = copy.deepcopy(model)
    ids = torch.randint(3, 96, (3, 5), generator=torch.Generator().manual_seed(59))
    handle = offload(model, cache_experts=3, device="cpu", cpu_compute=True, prefetch=prefetch)
    eb = handle.engine.expert_bytes
    handle.engine.costs = TransferCosts(h2d_bytes_per_s=float(eb), expert_bytes=eb, cpu_s_fixed=0.6, cpu_s_per_token=0.0)
    with torch.no_grad():
        torch.testing.assert_close(model.generate(ids, max_new_tokens=6, do_sample=False),
                                   ref.generate(ids, max_new_tokens=6, do_sample=False), rtol=0, atol=0)
    assert handle.engine.counters.cpu_computed > 0


def test_next_layer_then_layer_output_replaces_the_early_guesses_and_keeps_tokens():
    model, handle = _offloaded(prefetch="next_layer+layer_output", seed=60)
    ref = copy.deepcopy(tiny_model("mixtral", seed=60))
    engine = handle.engine
    assert all(p is not None for p in engine.predictors[:-1]) and all(p is not None for p in engine.out_predictors[:-1])
    replaced = []
    take = engine._take_prediction

    def spy(prefetch):
        replaced.append(list(engine._queue))  # the early guesses still queued when the late ones arrive
        return take(prefetch)

    engine._take_prediction = spy
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(61))
    with torch.no_grad():
        torch.testing.assert_close(model.generate(ids, max_new_tokens=8, do_sample=False),
                                   ref.generate(ids, max_new_tokens=8, do_sample=False), rtol=0, atol=0)
    s = handle.stats()
    assert replaced and s["prefetch_copies"] > 0 and 0 <= s["prefetch_precision"] <= 1
    assert s["prefetch_lead_s"] > 0
