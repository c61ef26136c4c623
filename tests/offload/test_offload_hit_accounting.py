"""Strict hit accounting (DESIGN.md: a hit is an expert whose weights are *already on the
device* when its layer needs them). On a CPU "device" copies land at once, so a fake
``copy_landed`` predicate makes chosen slots look still in flight: those experts must count as
in-flight hits (late prefetches), not as hits and not as misses copied again, and nothing else
(cache decisions, bytes, tokens) may change."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_models import tiny_model  # noqa: E402

from moekit.offload import offload  # noqa: E402
from moekit.offload.copies import ChunkedCopier  # noqa: E402


def _run(landed, prefetch="layer_output", seed=40):
    """Greedy generation with an offloaded tiny Mixtral whose ``copy_landed`` is ``landed``
    (None: the real one); returns (tokens, counters, stats)."""
    model = tiny_model("mixtral", seed=seed)
    handle = offload(model, cache_experts=5, device="cpu", prefetch=prefetch, policy="lru", lead_chunks=10**6)
    if landed is not None:
        handle.engine.copy_landed = landed
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    return out, handle.engine.counters, handle.stats()


def _misses(c):
    return c.activations - c.hits - c.inflight_hits


@pytest.fixture(scope="module")
def landed_run():
    return _run(None)


def test_copies_that_have_not_landed_are_inflight_hits_not_hits(landed_run):
    out, c, s = landed_run
    late_out, late, late_s = _run(lambda slot: False)  # every copy still running when asked
    torch.testing.assert_close(late_out, out, rtol=0, atol=0)
    assert c.inflight_hits == 0 and c.hits > 0 and c.prefetch_useful > 0
    # same cache decisions and bytes: only the label of a resident expert changed
    assert late.hits == 0 and late.inflight_hits == c.hits and late.prefetch_useful == 0
    assert (late.activations, late.demand_copies, late.h2d_bytes, late.prefetch_copies) == \
        (c.activations, c.demand_copies, c.h2d_bytes, c.prefetch_copies)
    assert _misses(late) == _misses(c) == late.demand_copies  # not counted as misses copied again
    assert late_s["hit_rate"] == 0.0 and late_s["inflight_hit_rate"] == pytest.approx(s["hit_rate"])


def test_hits_and_inflight_hits_split_by_the_slot_asked(landed_run):
    _, c, s = landed_run
    _, mixed, mixed_s = _run(lambda slot: slot % 2 == 0)  # odd slots still copying
    assert mixed.hits > 0 and mixed.inflight_hits > 0
    assert mixed.hits + mixed.inflight_hits == c.hits and mixed.demand_copies == c.demand_copies
    assert mixed.prefetch_useful <= c.prefetch_useful
    assert mixed_s["hit_rate"] + mixed_s["inflight_hit_rate"] == pytest.approx(s["hit_rate"])
    assert 0.0 < mixed_s["hit_rate"] < s["hit_rate"]


def test_partly_prefetched_expert_is_a_miss_even_if_its_chunks_landed():
    # one chunk per pump: most guesses are issued part-way when their layer's routing arrives;
    # such an expert is a miss (its remaining chunks are copied on demand), never a hit
    model = tiny_model("mixtral", seed=42)
    handle = offload(model, cache_experts=5, device="cpu", prefetch="layer_output", lead_chunks=1, chunk_bytes=1024)
    asked = []
    real = handle.engine.copy_landed
    handle.engine.copy_landed = lambda slot: asked.append(handle.engine.copier.complete(slot)) or real(slot)
    with torch.no_grad():
        model.generate(torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(43)), max_new_tokens=12,
                       do_sample=False)
    c = handle.engine.counters
    assert asked and all(asked)  # only fully issued experts are asked whether they landed
    assert len(asked) == c.hits + c.inflight_hits and c.demand_copies == _misses(c)
    assert c.prefetch_copies > c.prefetch_useful  # some prefetches were issued part-way and missed


def test_copier_on_cpu_lands_at_once():
    w_in, w_out = [torch.randn(2, 6, 4)], [torch.randn(2, 4, 3)]
    copier = ChunkedCopier(w_in, w_out, torch.empty(1, 6, 4), torch.empty(1, 4, 3), torch.device("cpu"), 16)
    copier.assign(0)
    assert copier.landed(0)
    copier.issue((0, 1), 0, max_chunks=1)
    assert copier.landed(0) and not copier.complete(0)


@pytest.mark.parametrize("prefetch", ["none", "next_layer", "layer_output"])
def test_prefetch_lead_is_measured_once_per_predicted_layer_call(prefetch):
    model = tiny_model("mixtral", seed=44)  # 2 MoE layers: layer 1 is the only one predicted
    handle = offload(model, cache_experts=5, device="cpu", prefetch=prefetch)
    with torch.no_grad():
        model.generate(torch.randint(3, 96, (2, 4), generator=torch.Generator().manual_seed(45)), max_new_tokens=5,
                       do_sample=False)
    c, s = handle.engine.counters, handle.stats()
    if prefetch == "none":
        assert c.prefetch_leads == 0 and s["prefetch_lead_s"] != s["prefetch_lead_s"]  # NaN: no prefetch
    else:
        assert c.prefetch_leads == len(handle.forward_log) == c.layer_calls // 2
        assert 0.0 <= s["prefetch_lead_s"] < s["wall_s"]
