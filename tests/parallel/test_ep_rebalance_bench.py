"""The core loop of benchmarks/bench_ep_rebalance.py on 2 forked gloo ranks, a few steps:
replans happen every N steps, the bytes it reports are the MoveReports' and equal
``metrics.moves`` times the bytes of one expert's weights and Adam moments, movement-aware
replans move no more than full replans, and every arm ends with the same logical weights."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit.metrics import moves as count_moves

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_ep_rebalance.py"


def _bench():
    name = "bench_ep_rebalance"
    if name not in sys.modules:  # dataclasses need the module registered while it executes
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _rank(rank: int, world: int, port: int, settings, out: str) -> None:
    torch.set_num_threads(1)  # one core per rank: 2 ranks x 2 threads on 2 cores spin against each other
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = _bench().run_loop(settings)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def loop_result(tmp_path_factory):
    bench = _bench()
    settings = bench.LoopSettings(steps=8, replan_every=3, tokens=64, dim=16, ffn=8, num_experts=8, top_k=2,
                                  layers=2, redundant_per_rank=2, skew=3.0, drift=0.3)
    out = str(tmp_path_factory.mktemp("rebalance") / "result.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_rank, args=(2, port, settings, out), nprocs=2, start_method="fork", join=False)
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("rebalance loop hung for 60 s")
    with open(out) as f:
        return settings, json.load(f)


def test_replans_every_n_steps(loop_result):
    settings, result = loop_result
    assert result["replans"]["static"] == []
    for arm in ("eplb", "moekit"):
        assert [r["step"] for r in result["replans"][arm]] == [3, 6]
        # the plan in service changes exactly at the replan steps
        assert result["steps"][arm]["plan_index"] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert result["steps"]["static"]["plan_index"] == [0] * settings.steps


def test_bytes_are_the_move_reports_and_the_moves(loop_result):
    settings, result = loop_result
    bench = _bench()
    summary = bench.summarize(result, settings)
    per_expert = result["expert_bytes"]
    assert per_expert == (2 * settings.ffn * settings.dim + settings.dim * settings.ffn) * 4  # fp32 SwiGLU
    for arm in ("eplb", "moekit"):
        reps = result["replans"][arm]
        assert summary["arms"][arm]["bytes_moved"] == sum(r["bytes_total"] for r in reps)
        previous = np.array(result["initial_phy2log"])
        for r in reps:
            moves = count_moves(previous, np.array(r["phy2log"]), result["world"])
            assert r["moves"] == moves
            assert r["weight_bytes"] == moves * per_expert
            assert r["state_bytes"] == 2 * moves * per_expert  # Adam exp_avg and exp_avg_sq; no grads
            assert r["bytes_total"] == r["weight_bytes"] + r["state_bytes"]
            previous = np.array(r["phy2log"])
    assert summary["arms"]["eplb"]["moves"] > 0  # a fresh plan of a drifted load moves something


def test_movement_aware_moves_at_most_full_replans(loop_result):
    settings, result = loop_result
    summary = _bench().summarize(result, settings)
    assert summary["arms"]["moekit"]["bytes_moved"] <= summary["arms"]["eplb"]["bytes_moved"]


def test_balancedness_and_same_training_in_every_arm(loop_result):
    settings, result = loop_result
    steps = result["steps"]
    for arm in steps:
        bal = np.array(steps[arm]["balancedness"])
        assert bal.shape == (settings.steps,) and np.all((bal > 0) & (bal <= 1))
        assert np.all(np.array(steps[arm]["step_ms"]) > 0)
    # same plan and same routed counts before the first replan -> same balancedness
    np.testing.assert_allclose(steps["eplb"]["balancedness"][:3], steps["static"]["balancedness"][:3])
    counts = np.array(result["global_counts"])
    assert counts.shape == (settings.steps, settings.layers, settings.num_experts)
    assert np.all(counts.sum(axis=2) == 2 * settings.tokens * settings.top_k)
    # moving experts (weights and Adam state) does not change training
    ref = np.array(result["logical_weight_abs_sum"]["static"])
    for arm in ("eplb", "moekit"):
        np.testing.assert_allclose(result["logical_weight_abs_sum"][arm], ref, rtol=1e-5)
