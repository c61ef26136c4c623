"""Session-4 engine behaviour on a CPU "device": a ``layer_output`` prediction starts its
prefetch at the first poll between the host's launches (not only while the host waits for the
next layer's counts); the combined ``next_layer+layer_output`` prefetch; misses that must stream
through the slots count as copy work when CPU computation is weighed; CPU-computed experts are
summed in ascending expert order after the device work is queued, and their observed times
refine the cost model."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_models import tiny_model  # noqa: E402

from moekit.offload import TransferCosts, offload  # noqa: E402


def _with_cpu_cost(handle, cpu_s: float, adapt: float = 0.0):
    """Replace the measured costs: copies take 1 s per expert, CPU experts ``cpu_s``."""
    eb = handle.engine.expert_bytes
    handle.engine.costs = TransferCosts(float(eb), eb, cpu_s_fixed=cpu_s, cpu_s_per_token=0.0, cpu_adapt=adapt)
    return handle


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


def test_streamed_misses_count_as_copy_work_so_the_cpu_takes_some():
    # one slot per layer and 4 tokens on 6 experts: most misses find every slot protected and
    # stream later; CPU 3.5 s vs copy 1 s per expert: the CPU wins only once three copies are
    # queued, which it can see only if the streamed misses count in the copy backlog
    model = tiny_model("olmoe", seed=56)
    ref = copy.deepcopy(model)
    ids = torch.randint(3, 96, (4, 4), generator=torch.Generator().manual_seed(57))
    handle = _with_cpu_cost(offload(model, cache_experts=2, device="cpu", cpu_compute=True), 3.5)
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
    handle = _with_cpu_cost(offload(model, cache_experts=3, device="cpu", cpu_compute=True, prefetch=prefetch), 0.6)
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
    read = engine._read_prediction

    def spy(pending, known=-1):
        replaced.append(list(engine._queue))  # the early guesses still queued when the late ones arrive
        return read(pending, known)

    engine._read_prediction = spy
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(61))
    with torch.no_grad():
        torch.testing.assert_close(model.generate(ids, max_new_tokens=8, do_sample=False),
                                   ref.generate(ids, max_new_tokens=8, do_sample=False), rtol=0, atol=0)
    s = handle.stats()
    assert replaced and s["prefetch_copies"] > 0 and 0 <= s["prefetch_precision"] <= 1
    assert s["prefetch_lead_s"] > 0


def test_observed_cpu_times_move_the_cost_model_only_when_adapting():
    fixed = TransferCosts(h2d_bytes_per_s=1e9, expert_bytes=10**6, cpu_s_fixed=0.010, cpu_s_per_token=0.001)
    fixed.observe_cpu(0.050, 2)
    assert fixed.cpu_s_fixed == 0.010  # cpu_adapt 0: the measured model stays
    costs = TransferCosts(1e9, 10**6, 0.010, 0.001, cpu_adapt=0.5)
    costs.observe_cpu(0.032, 2)  # fixed part of this sample: 0.030
    assert costs.cpu_s_fixed == pytest.approx(0.020) and costs.cpu_s_per_token == 0.001
    for _ in range(30):
        costs.observe_cpu(0.032, 2)
    assert costs.cpu_s_fixed == pytest.approx(0.030)
    assert not costs.prefer_cpu(1, backlog_s=0.0)  # 31 ms on the CPU vs a 1 ms copy


def test_offload_refines_the_cpu_cost_from_the_cpu_experts_it_computes():
    model = tiny_model("olmoe", seed=62)
    handle = offload(model, cache_experts=2, device="cpu", cpu_compute=True)
    assert handle.engine.costs.cpu_adapt > 0
    # a made-up 1.5 s per CPU expert (copy 1 s): a miss goes to the CPU once two copies are
    # queued, and the real (sub-millisecond) times of those CPU experts then pull the figure down
    _with_cpu_cost(handle, 1.5, adapt=0.5)
    ids = torch.randint(3, 96, (4, 4), generator=torch.Generator().manual_seed(63))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert handle.engine.counters.cpu_computed > 0
    assert handle.engine.costs.cpu_s_fixed < 0.1
