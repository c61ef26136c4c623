"""On the GPU: offloaded greedy generation is token-identical to the plain model for every
family, and the peak GPU memory stays under the configured budget."""

import copy
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_models import FAMILY_NAMES, tiny_model  # noqa: E402

from moekit.offload import TransferCosts, offload  # noqa: E402
from moekit.offload.copies import ChunkedCopier  # noqa: E402
from moekit.offload.routing_plan import experts_output_reference  # noqa: E402

pytestmark = pytest.mark.gpu


def _reference_and_budget(model, seed: int):
    """(prompt ids on the GPU, the plain model's greedy tokens, device memory allocated before
    offloading, a budget of the dense weights + 4 expert slots + 2 MiB for activations and the
    KV cache); resets the peak-memory counter."""
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(seed)).cuda()
    plain = copy.deepcopy(model).cuda()
    with torch.no_grad():
        expected = plain.generate(ids, max_new_tokens=12, do_sample=False)
    del plain
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    experts = [p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    expert_bytes = sum(p.numel() * p.element_size() for p in experts) // (len(experts) // 2) // experts[0].shape[0]
    dense = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) \
        - sum(p.numel() * p.element_size() for p in experts)
    return ids, expected, base, dense + 4 * expert_bytes + 2 * 2**20


def _check_generation(model, ids, expected, base: int, budget: int) -> None:
    """The offloaded model's greedy tokens equal the plain model's ``expected``, and its peak
    GPU memory above ``base`` stays within ``budget`` (bytes)."""
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=12, do_sample=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= budget, f"peak {peak} > budget {budget}"


@pytest.mark.parametrize("prefetch", ["none", "next_layer", "layer_output", "next_layer+layer_output"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gpu_offload_token_identical_and_under_budget(family, prefetch):
    model = tiny_model(family, seed=20)
    ids, expected, base, budget = _reference_and_budget(model, seed=21)
    # small chunks, one queued ahead: prefetches are dropped or completed part-way
    handle = offload(model, gpu_memory=budget, reserve=2 * 2**20, policy="lru", prefetch=prefetch,
                     chunk_bytes=2048, lead_chunks=1, prefetch_extra=1)
    assert handle.num_slots == 4 and handle.engine.device.type == "cuda"
    _check_generation(model, ids, expected, base, budget)
    s = handle.stats()
    assert s["h2d_bytes"] > 0 and s["stall_s"] >= 0 and 0 < s["pcie_utilization"] < 1.5
    assert 0 < s["copy_busy_s"] < s["wall_s"]
    assert s["demand_copies"] == s["activations"] - s["hits"] - s["inflight_hits"]
    assert 0 <= s["hit_rate"] + s["inflight_hit_rate"] <= 1
    if prefetch != "none":  # predictions were made and scored (copies only where a slot was free to take)
        assert 0 <= s["prefetch_precision"] <= 1 and 0 <= s["prefetch_recall"] <= 1


def test_gpu_copier_landed_only_after_the_copy_finished():
    # the slot is "read" by a long sleep kernel on the compute stream, so its next copy must wait
    # for it: issued (complete) but not landed until the sleep and the copy have finished
    w_in, w_out = [torch.randn(2, 64, 32).pin_memory()], [torch.randn(2, 32, 32).pin_memory()]
    copier = ChunkedCopier(w_in, w_out, torch.empty(1, 64, 32, device="cuda"), torch.empty(1, 32, 32, device="cuda"),
                           torch.device("cuda"), chunk_bytes=4096)
    copier.assign(0)
    assert copier.landed(0)  # nothing issued yet
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock cycles
    copier.mark_read(0)
    copier.issue((0, 1), 0)
    assert copier.complete(0) and not copier.landed(0)
    torch.cuda.synchronize()
    assert copier.landed(0)
    torch.testing.assert_close(copier.slot_in[0].cpu(), w_in[0][1], rtol=0, atol=0)


def test_gpu_cpu_computed_misses_match_the_plain_model():
    # misses split between the CPU (0.6 s per expert in the cost model) and copies (1 s): the CPU
    # results come back through pinned memory behind the queued device work and are summed in
    # ascending expert order; fp32 on both sides, so the logits agree to rounding
    model = tiny_model("olmoe", seed=23)
    ids = torch.randint(3, 96, (4, 6), generator=torch.Generator().manual_seed(24)).cuda()
    plain = copy.deepcopy(model).cuda()
    with torch.no_grad():
        expected = plain(ids).logits
    handle = offload(model, cache_experts=2, cpu_compute=True)
    eb = handle.engine.expert_bytes
    handle.engine.costs = TransferCosts(h2d_bytes_per_s=float(eb), expert_bytes=eb, cpu_s_fixed=0.6, cpu_s_per_token=0.0)
    for _ in range(2):
        with torch.no_grad():
            got = model(ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    c = handle.engine.counters
    assert c.cpu_computed > 0 and c.demand_copies > 0


def test_gpu_slow_cpu_experts_on_the_worker_give_the_eager_output():
    # every expert goes to the CPU (0.01 s there vs 1 s per copy) and each sleeps 0.1 s first on
    # the worker thread: the layer waits for the rows before copying them out of the pinned
    # buffer (copied early, they would be the buffer's old contents), and its output is the
    # eager loop's
    model = tiny_model("mixtral", seed=25)
    handle = offload(model, cache_experts=2, cpu_compute=True)
    engine = handle.engine
    eb = engine.expert_bytes
    engine.costs = TransferCosts(h2d_bytes_per_s=float(eb), expert_bytes=eb, cpu_s_fixed=0.01, cpu_s_per_token=0.0)
    g = torch.Generator().manual_seed(26)
    dim, experts = engine.host_w_in[0].shape[2], engine.num_experts
    x_TD = torch.randn(6, dim, generator=g).cuda()
    idx_TK = torch.stack([torch.randperm(experts, generator=g)[:2] for _ in range(6)]).cuda()
    w_TK = torch.rand(6, 2, generator=g).cuda()
    with torch.no_grad():  # warm-up: first kernel loads are not the layer's host time
        engine.forward(0, x_TD, idx_TK, w_TK)
    torch.cuda.synchronize()
    handle.reset_stats()
    act = engine.cpu.act_fn
    engine.cpu.act_fn = lambda x: (time.sleep(0.1), act(x))[1]
    t0 = time.perf_counter()
    with torch.no_grad():
        out = engine.forward(0, x_TD, idx_TK, w_TK)
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    cpu_experts = engine.counters.cpu_computed
    assert cpu_experts >= 2
    assert host_s > 0.1 * cpu_experts  # the host waited for the worker
    expected = experts_output_reference(x_TD, idx_TK, w_TK, engine.host_w_in[0].cuda(), engine.host_w_out[0].cuda(),
                                        act)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert handle.stats()["cpu_busy_s"] > 0.1 * cpu_experts


@pytest.mark.parametrize("prefetch", ["layer_output", "layer_output2"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gpu_staged_prefetch_token_identical_and_under_budget(family, prefetch):
    # 2 of the 4 budgeted slots are staging slots: guesses wait there (copied in 2 KiB chunks,
    # one queued ahead) and a layer needing more experts than its cache quota reads a staged
    # expert in place
    model = tiny_model(family, seed=25)
    ids, expected, base, budget = _reference_and_budget(model, seed=26)
    handle = offload(model, gpu_memory=budget, reserve=2 * 2**20, prefetch=prefetch, staging_slots=2,
                     chunk_bytes=2048, lead_chunks=1)
    assert handle.num_slots == 2 and handle.engine.slot_in.shape[0] == 4
    _check_generation(model, ids, expected, base, budget)
    s = handle.stats()
    assert s["prefetch_copies"] > 0
    assert s["demand_copies"] == s["activations"] - s["hits"] - s["inflight_hits"]
    assert s["prefetch_useful"] == s["staged_hits"] - s["victim_hits"]
    assert s["staged_hits"] + s["staged_inflight_hits"] + s["staged_misses"] > 0
