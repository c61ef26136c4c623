"""The offload engine's host path: prefetch hooks only while a predictor is set, demand copies
merged only without prefetch, resident experts computed before the missing ones."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_models import tiny_model  # noqa: E402

from moekit.offload import offload  # noqa: E402


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_prefetch_hooks_follow_the_prefetch_mode():
    model = tiny_model("mixtral", seed=1)
    handle = offload(model, cache_experts=3, device="cpu")
    base = _hook_count(model)
    assert base == 2 and not handle.engine.prefetching  # the model's own timing hooks only
    handle.reconfigure(prefetch="layer_output")
    with_prefetch = _hook_count(model)
    assert handle.engine.prefetching and with_prefetch > base
    handle.reconfigure(prefetch="none")
    assert _hook_count(model) == base
    handle.reconfigure(prefetch="next_layer")  # polls the queue, no output hooks
    assert 2 < _hook_count(model) < with_prefetch
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert handle.stats()["prefetch_copies"] > 0
    handle.remove_hooks()
    assert _hook_count(model) == 0


def test_demand_copies_are_merged_only_without_prefetch():
    model = tiny_model("mixtral", seed=1)
    handle = offload(model, cache_experts=2, device="cpu", chunk_bytes=512)
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    for prefetch, merged in (("none", {True}), ("next_layer", {False})):
        handle.reconfigure(prefetch=prefetch)
        copier, seen = handle.engine.copier, []
        issue = copier.issue

        def spy(key, slot, max_chunks=None, merged=False, issue=issue, seen=seen):
            seen.append((max_chunks, merged))
            return issue(key, slot, max_chunks, merged)

        copier.issue = spy
        with torch.no_grad():
            model(ids)
        s = handle.stats()
        assert copier.num_chunks > 2 and s["demand_copies"] > 0
        assert {m for n, m in seen if n is None} == merged  # demand copies (all remaining chunks)
        if prefetch == "none":  # merged copies move whole experts, counted as before
            assert s["h2d_bytes"] == s["demand_copies"] * handle.engine.expert_bytes


def _one_layer_engine(engine_cls, costs_cls, slots=4):
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(3)
    w_in, w_out = [torch.randn(8, 12, 6, generator=gen)], [torch.randn(8, 6, 6, generator=gen)]
    costs = costs_cls(1e9, 12 * 6 * 4 + 6 * 6 * 4, float("inf"), 0.0)
    return engine_cls(w_in, w_out, slots, "lru", torch.device("cpu"), F.silu, costs), w_in[0], w_out[0]


def test_resident_experts_are_computed_first_so_streamed_misses_evict_no_needed_expert():
    import torch.nn.functional as F

    from moekit.offload import OffloadEngine, TransferCosts
    from moekit.offload.routing_plan import experts_output_reference

    engine, w_in, w_out = _one_layer_engine(OffloadEngine, TransferCosts)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(4))
    w = torch.rand(3, 2, generator=torch.Generator().manual_seed(5))
    engine.forward(0, x[:2], torch.tensor([[4, 5], [6, 7]]), w[:2])  # fills the 4 slots
    c = engine.counters
    copies, hits = c.demand_copies, c.hits
    # experts 4-7 resident (all needed again), 0 and 1 missing with every slot needed: the misses
    # stream through the slots of experts already computed. In ascending order (the fifth
    # session's engine) 0 came first, found no computed expert and evicted 4, which was then
    # copied again: 3 copies for 2 misses
    idx = torch.tensor([[0, 4], [1, 5], [6, 7]])
    out = engine.forward(0, x, idx, w)
    assert c.hits - hits == 4 and c.demand_copies - copies == 2
    assert torch.equal(out, experts_output_reference(x, idx, w, w_in, w_out, F.silu))
