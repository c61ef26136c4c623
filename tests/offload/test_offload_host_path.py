"""The offload engine's host path: prefetch hooks only while a predictor is set, demand copies
merged only without prefetch."""

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
