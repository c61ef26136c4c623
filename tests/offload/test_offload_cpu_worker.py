"""Session-7 CPU experts on a worker thread (``moekit.offload.cpu_experts``), on a CPU "device":
the rows a job writes equal the eager expert's times the combine weight bit for bit, whatever
the experts' order and block sizes; the engine computes its CPU experts on the worker and keeps
greedy tokens; a failing job is reported by the launching thread."""

import copy
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_models import tiny_model  # noqa: E402

from moekit.offload import TransferCosts, offload  # noqa: E402
from moekit.offload.cpu_experts import CpuExperts  # noqa: E402
from moekit.offload.routing_plan import expert_forward  # noqa: E402


def _weights(layers=2, experts=4, dim=8, ffn=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w_in = [torch.randn(experts, 2 * ffn, dim, generator=g).to(dtype) for _ in range(layers)]
    w_out = [torch.randn(experts, dim, ffn, generator=g).to(dtype) for _ in range(layers)]
    return w_in, w_out


def _job(counts, dim, seed, dtype):
    """(starts_E1, tok_N, x_TD, w_N1) of an expert-sorted layout with ``counts`` rows per expert."""
    g = torch.Generator().manual_seed(seed)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    tokens = max(starts[-1], 1)
    x_TD = torch.randn(tokens, dim, generator=g).to(dtype)
    tok_N = torch.randint(0, tokens, (starts[-1],), generator=g)
    w_N1 = torch.rand(starts[-1], 1, generator=g).to(dtype)
    return starts, tok_N, x_TD, w_N1


@settings(max_examples=25, deadline=None)
@given(counts=st.lists(st.integers(0, 5), min_size=4, max_size=4), layer=st.integers(0, 1),
       pick=st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_job_rows_equal_the_eager_expert_times_the_weight(counts, layer, pick, dtype):
    w_in, w_out = _weights(dtype=dtype)
    starts, tok_N, x_TD, w_N1 = _job(counts, 8, seed=sum(counts), dtype=dtype)
    done = []
    cpu = CpuExperts(w_in, w_out, F.silu, torch.device("cpu"), lambda s, n: done.append(n))
    y_ND = torch.full((starts[-1], 8), float("nan"), dtype=dtype)
    cpu.submit(layer, pick, starts, tok_N, x_TD)
    cpu.receive(pick, starts, y_ND, w_N1)
    for e in pick:
        s, t = starts[e], starts[e + 1]
        expected = expert_forward(x_TD[tok_N[s:t]], w_in[layer][e], w_out[layer][e], F.silu) * w_N1[s:t]
        torch.testing.assert_close(y_ND[s:t], expected, rtol=0, atol=0)
    assert sorted(done) == sorted(counts[e] for e in pick)  # one on_done per expert, with its tokens
    untouched = [r for e in range(4) if e not in pick for r in range(starts[e], starts[e + 1])]
    assert torch.isnan(y_ND[untouched]).all()
    cpu.close()


def test_buffer_grows_and_later_jobs_are_not_mixed_up():
    w_in, w_out = _weights(seed=3)
    cpu = CpuExperts(w_in, w_out, F.silu, torch.device("cpu"), lambda s, n: None)
    for i, counts in enumerate(([1, 0, 2, 0], [40, 30, 20, 10], [0, 3, 0, 1])):  # 3 -> 100 -> 4 rows
        starts, tok_N, x_TD, w_N1 = _job(counts, 8, seed=10 + i, dtype=torch.float32)
        experts = [e for e, c in enumerate(counts) if c]
        y = torch.zeros(starts[-1], 8)
        cpu.submit(i % 2, experts, starts, tok_N, x_TD)
        cpu.receive(experts, starts, y, w_N1)
        for e in experts:
            s, t = starts[e], starts[e + 1]
            torch.testing.assert_close(
                y[s:t], expert_forward(x_TD[tok_N[s:t]], w_in[i % 2][e], w_out[i % 2][e], F.silu) * w_N1[s:t])
    assert cpu._buf.shape[0] >= 100
    cpu.close()
    assert cpu._pool is None


def test_a_failing_job_is_raised_by_the_launching_thread_once():
    w_in, w_out = _weights(seed=4)

    def broken(x):
        raise ValueError("boom")

    cpu = CpuExperts(w_in, w_out, broken, torch.device("cpu"), lambda s, n: None)
    starts, tok_N, x_TD, _ = _job([1, 1, 0, 0], 8, seed=5, dtype=torch.float32)
    cpu.submit(0, [0, 1], starts, tok_N, x_TD)
    with pytest.raises(RuntimeError, match="on the CPU failed"):
        cpu.drain()
    cpu.drain()  # reported once
    cpu.close()


def test_engine_computes_cpu_experts_on_the_worker_and_keeps_tokens():
    model = tiny_model("qwen3_moe", seed=70)
    ref = copy.deepcopy(model)
    ids = torch.randint(3, 96, (3, 5), generator=torch.Generator().manual_seed(71))
    handle = offload(model, cache_experts=3, device="cpu", cpu_compute=True)
    eb = handle.engine.expert_bytes
    handle.engine.costs = TransferCosts(float(eb), eb, cpu_s_fixed=0.6, cpu_s_per_token=0.0)
    threads = set()
    act = handle.engine.cpu.act_fn
    handle.engine.cpu.act_fn = lambda x: (threads.add(threading.current_thread().name), act(x))[1]
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=6, do_sample=False)
        expected = ref.generate(ids, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    stats = handle.stats()
    assert stats["cpu_computed"] > 0 and stats["cpu_busy_s"] > 0
    assert threads and all(name.startswith("moekit-cpu-experts") for name in threads)
    old = handle.engine.cpu
    handle.reconfigure(cpu_compute=False)  # the old engine's worker is stopped
    assert handle.engine.cpu is None and old._pool is None
