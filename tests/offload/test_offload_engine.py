"""Offloading logic on a CPU "device": token-identical greedy generation for every family,
cache policies, prefetch decisions, CPU computation of misses, and the accounting."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_models import FAMILY_NAMES, tiny_model  # noqa: E402

from moekit.offload import OffloadedExperts, TransferCosts, offload  # noqa: E402

# one cache setting per family keeps the suite fast while covering every code path
SETTINGS = {
    "mixtral": dict(cache_experts=3, policy="lru"),
    "qwen2_moe": dict(cache_experts=9, policy="lfu", prefetch="next_layer"),
    "qwen3_moe": dict(cache_experts=1, policy="lru"),  # fewer slots than experts per layer: streaming
    "olmoe": dict(cache_experts=12, policy="lfu"),  # everything fits: only cold misses
    "deepseek_v3": dict(cache_experts=10, policy="lru", prefetch="next_layer"),
}


def _generate(model, ids, n=6):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False)


def _check_accounting(handle, num_layers):
    s, c = handle.stats(), handle.engine.counters
    assert c.inflight_hits == 0 and s["inflight_hit_rate"] == 0.0  # CPU copies land at once
    misses = c.activations - c.hits
    # every miss is fetched or computed on the CPU, and fetched once for all its tokens (with at
    # least as many slots as a layer call needs experts)
    assert c.demand_copies == misses - c.cpu_computed
    assert c.h2d_bytes == (c.demand_copies + c.prefetch_copies) * handle.engine.expert_bytes
    assert c.layer_calls == num_layers * len(handle.forward_log)
    assert sum(r.h2d_bytes for r in handle.forward_log) == c.h2d_bytes
    assert sum(r.hits for r in handle.forward_log) == c.hits
    assert sum(r.inflight_hits for r in handle.forward_log) == c.inflight_hits
    assert 0.0 <= s["hit_rate"] <= 1.0 and s["tokens"] == sum(r.tokens for r in handle.forward_log)
    assert s["h2d_bytes_per_token"] == pytest.approx(c.h2d_bytes / c.tokens)
    return s


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_offloaded_greedy_generation_is_token_identical(family):
    model = tiny_model(family, seed=4)
    ref = copy.deepcopy(model)
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(5))
    expected = _generate(ref, ids)
    handle = offload(model, device="cpu", **SETTINGS[family])
    assert all(isinstance(m, OffloadedExperts) for m in model.modules() if type(m).__name__.endswith("Experts")
               and "Shared" not in type(m).__name__)
    assert not any(n.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3 for n, p in model.named_parameters())
    torch.testing.assert_close(_generate(model, ids), expected, rtol=0, atol=0)
    s = _check_accounting(handle, num_layers=len(handle.engine.host_w_in))
    if "prefetch" in SETTINGS[family]:
        assert 0.0 <= s["prefetch_precision"] <= 1.0 and 0.0 <= s["prefetch_recall"] <= 1.0
        assert s["prefetch_copies"] > 0


@pytest.mark.parametrize("slots", [1, 3])
def test_batch_fetches_each_needed_expert_once_per_layer_call(slots):
    model = tiny_model("mixtral", seed=6)
    handle = offload(model, cache_experts=slots, device="cpu")  # fewer slots than a layer call needs
    ids = torch.randint(3, 96, (8, 4), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for _ in range(3):
            model(ids)
    c = handle.engine.counters
    # 32 tokens x top-2 over 4 experts: every expert needed by many tokens, each copied once per
    # layer call, streaming through the slots (3 slots, quota 1 per layer: borrowing)
    assert c.activations == 3 * 2 * 4 and c.demand_copies == c.activations - c.hits
    assert len(handle.engine.cache) == slots


def test_next_layer_prefetch_predicts_with_next_router_and_never_costs_hits():
    rates = {}
    for prefetch in ("none", "next_layer"):
        model = tiny_model("mixtral", seed=8)
        handle = offload(model, cache_experts=6, device="cpu", prefetch=prefetch)
        _generate(model, torch.randint(3, 96, (1, 4), generator=torch.Generator().manual_seed(9)), n=24)
        rates[prefetch] = handle.stats()
    s = rates["next_layer"]
    # prediction = the next router applied to this layer's input: far better than chance (k/E = 1/2)
    assert s["prefetch_recall"] > 0.7 and s["prefetch_precision"] > 0.7
    assert s["prefetch_copies"] > 0 and s["prefetch_useful"] > 0
    assert s["hit_rate"] >= rates["none"]["hit_rate"]


def test_cpu_compute_of_misses_matches_and_is_counted():
    model = tiny_model("olmoe", seed=10)
    ref = copy.deepcopy(model)
    ids = torch.randint(3, 96, (2, 4), generator=torch.Generator().manual_seed(11))
    handle = offload(model, cache_experts=2, device="cpu", cpu_compute=True)
    # a cost model where copying is slow: every miss is computed on the CPU, nothing is copied
    handle.engine.costs = TransferCosts(h2d_bytes_per_s=1.0, expert_bytes=handle.engine.expert_bytes,
                                        cpu_s_fixed=0.0, cpu_s_per_token=1e-6)
    torch.testing.assert_close(_generate(model, ids), _generate(ref, ids), rtol=0, atol=0)
    c = handle.engine.counters
    assert c.cpu_computed == c.activations - c.hits > 0 and c.demand_copies == 0 and c.h2d_bytes == 0


def test_gpu_memory_budget_sets_the_slots_and_bad_input_is_rejected():
    model = tiny_model("mixtral")
    expert_bytes = 3 * 32 * 48 * 4
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    dense = sum(t.numel() * t.element_size() for n, t in tensors if not n.endswith(("gate_up_proj", "down_proj")))
    handle = offload(copy.deepcopy(model), gpu_memory=dense + 5 * expert_bytes + 1000, reserve=1000, device="cpu")
    assert handle.num_slots == 5 and handle.stats()["dense_bytes"] == dense
    with pytest.raises(ValueError, match="gpu_memory: expected at least"):
        offload(copy.deepcopy(model), gpu_memory=dense, device="cpu")
    with pytest.raises(ValueError, match="exactly one"):
        offload(copy.deepcopy(model), device="cpu")
    with pytest.raises(ValueError, match="policy"):
        offload(copy.deepcopy(model), cache_experts=2, policy="fifo", device="cpu")
    with pytest.raises(ValueError, match="prefetch"):
        offload(copy.deepcopy(model), cache_experts=2, prefetch="oracle", device="cpu")
    offload(model, cache_experts=2, device="cpu")
    with pytest.raises(ValueError, match="not offloaded yet"):
        offload(model, cache_experts=2, device="cpu")


def test_reconfigure_starts_a_fresh_cache_with_new_settings():
    model = tiny_model("mixtral", seed=12)
    ref = copy.deepcopy(model)
    ids = torch.randint(3, 96, (1, 4), generator=torch.Generator().manual_seed(13))
    handle = offload(model, cache_experts=2, device="cpu")
    _generate(model, ids)
    handle.reconfigure(cache_experts=5, policy="lfu", prefetch="next_layer")
    assert handle.num_slots == 5 and handle.engine.counters.activations == 0 and len(handle.engine.cache) == 0
    torch.testing.assert_close(_generate(model, ids), _generate(ref, ids), rtol=0, atol=0)
    assert handle.stats()["policy"] == "lfu" and handle.stats()["prefetch_copies"] > 0
    with pytest.raises(ValueError, match="cache_experts"):
        handle.reconfigure(cache_experts=0)
