"""Chunked copies and prefetch on a CPU "device": partial prefetches that are dropped or
completed keep generation token-identical, the byte accounting adds up, the prediction from
the decoder layer's output is exact when the next attention adds nothing, and misses are
split between the CPU and the copy engine by list scheduling."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_models import tiny_model  # noqa: E402

from moekit.offload import TransferCosts, offload  # noqa: E402
from moekit.offload.copies import ChunkedCopier, chunk_rows  # noqa: E402
from moekit.offload.engine import rank_predictions  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 300), row_bytes=st.integers(1, 64), chunk=st.integers(1, 4000))
def test_chunk_rows_cover_every_row_once_within_the_size(rows, row_bytes, chunk):
    ranges = chunk_rows(rows, row_bytes, chunk)
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a < b for a, b in ranges) and all(b == a2 for (_, b), (a2, _) in zip(ranges, ranges[1:]))
    assert all((b - a) * row_bytes <= max(chunk, row_bytes) * 2 for a, b in ranges)


def test_chunked_copier_partial_then_complete_copies_the_expert_exactly():
    w_in = [torch.randn(3, 10, 4)]
    w_out = [torch.randn(3, 4, 5)]
    slot_in, slot_out = torch.full((2, 10, 4), float("nan")), torch.full((2, 4, 5), float("nan"))
    copier = ChunkedCopier(w_in, w_out, slot_in, slot_out, torch.device("cpu"), chunk_bytes=3 * 16)
    assert copier.num_chunks == 4 + 2  # 10 rows of 16 bytes in 4 chunks, 4 rows of 20 bytes in 2
    copier.assign(1)
    first = copier.issue((0, 2), 1, max_chunks=2)
    assert not copier.complete(1) and first + copier.missing_bytes(1) == (40 + 20) * 4
    assert torch.isnan(slot_in[1, -1]).all()  # the last rows are not there yet
    rest = copier.missing_bytes(1)
    assert rest == (40 + 20) * 4 - first and copier.issue((0, 2), 1) == rest
    assert copier.complete(1) and copier.missing_bytes(1) == 0 and copier.issue((0, 2), 1) == 0
    torch.testing.assert_close(slot_in[1], w_in[0][2], rtol=0, atol=0)
    torch.testing.assert_close(slot_out[1], w_out[0][2], rtol=0, atol=0)


def test_rank_predictions_puts_predicted_experts_first_then_extra_by_mass():
    assert rank_predictions([0, 2, 0, 1], [0.5, 0.9, 0.1, 0.3], extra=0) == [1, 3]
    assert rank_predictions([0, 2, 0, 1], [0.5, 0.9, 0.1, 0.3], extra=1) == [1, 3, 0]
    assert rank_predictions([1, 1, 0, 0], [0.2, 0.4, 0.1, 0.3], extra=5) == [1, 0, 3, 2]


def _generate(model, ids, n=8):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("prefetch,extra", [("next_layer", 1), ("layer_output", 0), ("layer_output", 2)])
def test_partial_prefetches_keep_generation_identical_and_bytes_add_up(prefetch, extra):
    model = tiny_model("mixtral", seed=30)
    ref = copy.deepcopy(model)
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(31))
    # 3 * 32 * 48 * 4 bytes per expert in chunks of ~1 KiB (18 chunks); one prefetch chunk per
    # pump, so most guesses are dropped or completed part-way
    handle = offload(model, cache_experts=5, device="cpu", prefetch=prefetch, prefetch_extra=extra,
                     lead_chunks=1, chunk_bytes=1024)
    engine = handle.engine
    assert engine.copier.num_chunks > 10
    torch.testing.assert_close(_generate(model, ids, n=16), _generate(ref, ids, n=16), rtol=0, atol=0)
    c, s = engine.counters, handle.stats()
    assert c.demand_copies == c.activations - c.hits  # every miss fetched (the rest of it) once
    chunk_sizes = [size for *_, size in engine.copier.chunks]
    assert engine.copier.chunks_issued * min(chunk_sizes) <= c.h2d_bytes <= engine.copier.chunks_issued * max(chunk_sizes)
    assert 0 < c.prefetch_bytes < c.h2d_bytes and c.prefetch_copies > 0
    # partial prefetches: fewer bytes than whole experts for the copies started
    assert c.h2d_bytes < (c.demand_copies + c.prefetch_copies) * engine.expert_bytes
    assert 0.0 <= s["prefetch_precision"] <= 1.0 and 0.0 <= s["prefetch_recall"] <= 1.0
    assert s["copy_busy_s"] > 0


def test_layer_output_prediction_is_exact_when_the_next_attention_adds_nothing():
    model = tiny_model("mixtral", seed=32)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.self_attn.o_proj.weight.zero_()  # the next router input = norm(previous output)
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(33))
    handle = offload(model, cache_experts=6, device="cpu", prefetch="layer_output")
    _generate(model, ids)
    s = handle.stats()
    assert s["prefetch_precision"] == 1.0 and s["prefetch_recall"] == 1.0
    early = offload(copy.deepcopy(tiny_model("mixtral", seed=32)), cache_experts=6, device="cpu",
                    prefetch="next_layer")
    assert early.engine.out_predictors == [None] * 2 and handle.engine.predictors == [None] * 2


def test_cpu_and_copy_engine_share_the_misses():
    model = tiny_model("olmoe", seed=34)
    ref = copy.deepcopy(model)
    ids = torch.randint(3, 96, (4, 4), generator=torch.Generator().manual_seed(35))
    handle = offload(model, cache_experts=2, device="cpu", cpu_compute=True)
    eb = handle.engine.expert_bytes
    # CPU 0.6 s per expert, copy 1 s: misses alternate CPU, copy, CPU, ... (each to the queue
    # that finishes it first) instead of all going to the CPU
    handle.engine.costs = TransferCosts(h2d_bytes_per_s=float(eb), expert_bytes=eb, cpu_s_fixed=0.6, cpu_s_per_token=0.0)
    torch.testing.assert_close(_generate(model, ids, n=4), _generate(ref, ids, n=4), rtol=0, atol=0)
    c = handle.engine.counters
    assert c.cpu_computed > 0 and c.demand_copies > 0
    assert c.cpu_computed + c.demand_copies == c.activations - c.hits


def test_bad_prefetch_settings_are_rejected():
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="prefetch_extra"):
        offload(copy.deepcopy(model), cache_experts=2, device="cpu", prefetch_extra=-1)
    with pytest.raises(ValueError, match="lead_chunks"):
        offload(copy.deepcopy(model), cache_experts=2, device="cpu", lead_chunks=0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        offload(copy.deepcopy(model), cache_experts=2, device="cpu", chunk_bytes="lots")



@pytest.mark.parametrize("next_call, counted", [(0, 1), (1, 0)])
def test_guesses_evicted_before_their_layer_ran_are_counted(next_call, counted):
    # 2 slots for 2 layers (quota 1 each), both held by layer 1; a guess for layer 1's expert 0
    # evicts layer 1's least recent expert and enters as least recent. Layer 0 (below its
    # quota) then takes a slot from layer 1 (above its quota): the guess goes before layer 1
    # ran (counted). If layer 1 runs instead and does not need expert 0, its own demand copy
    # evicts the guess: a wrong guess, known wrong by then, not counted
    model = tiny_model("mixtral", seed=82)
    engine = offload(model, cache_experts=2, device="cpu", prefetch="layer_output", lead_chunks=10**6).engine
    num_experts, dim = engine.num_experts, engine.host_w_in[0].shape[2]
    x_TD, w_TK = torch.randn(1, dim), torch.rand(1, 2)
    with torch.no_grad():
        engine.forward(1, x_TD, torch.tensor([[1, 2]]), w_TK)
        engine._set_prefetch([(1, [1.0] + [0.0] * (num_experts - 1), [1.0] + [0.0] * (num_experts - 1))], set())
        assert engine.cache.resident() == [(1, 0), (1, 2)] and engine.counters.prefetch_copies == 1
        engine.forward(next_call, x_TD, torch.tensor([[3, 2]]), w_TK)
    assert (1, 0) not in engine.cache
    assert engine.counters.prefetch_evicted_early == counted
