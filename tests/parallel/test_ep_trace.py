"""benchmarks/ep_trace.py: a synced step's GPU time split into SM busy, SM idle waiting for the
host's launches and SM idle waiting for something else, on a hand-made chrome trace whose
answer is known."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "ep_trace.py"


def _trace_module():
    spec = importlib.util.spec_from_file_location("ep_trace", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _x(cat, name, ts, dur, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1, "args": args}


def test_step_timeline_splits_idle_time_by_cause():
    t = _trace_module()
    events = [
        _x("user_annotation", t.STEP, 1000, 1000),
        # host: an op launches k1 (call ends at 1100), k2 (ends 1150), k3 (ends 1500)
        _x("cpu_op", "moekit::route_by_expert", 1050, 60),
        _x("cuda_runtime", "cudaLaunchKernel", 1090, 10, correlation=1),
        _x("cpu_op", "aten::mm", 1140, 20),
        _x("cuda_runtime", "cudaLaunchKernel", 1145, 5, correlation=2),
        _x("cuda_driver", "cuLaunchKernelEx", 1490, 10, correlation=3),
        # GPU: k1 [1100, 1200) waited 100 us for its launch; a barrier [1200, 1600) spins and
        # does not count as busy; k2 [1300, 1400): launched long before, so its 100 us gap is
        # a wait; k3 [1500, 1900): 100 us gap, its launch ended at 1500, so all host-bound
        _x("kernel", "k1", 1100, 100, correlation=1, stream=7),
        _x("kernel", "barrier_kernel", 1200, 400, correlation=9, stream=9),
        _x("kernel", "k2", 1300, 100, correlation=2, stream=7),
        _x("gpu_memcpy", "Memcpy PtoP", 1250, 200, correlation=8, stream=9),
        _x("kernel", "gemm_long", 1500, 400, correlation=3, stream=7),
        # another step's kernel, outside the range: ignored
        _x("kernel", "k9", 2500, 10, correlation=4, stream=7),
    ]
    (step,) = t.step_timelines({"traceEvents": events})
    assert step["step_us"] == 1000
    assert step["sm_busy_us"] == 600  # k1 + k2 + k3
    assert step["sm_idle_host_us"] == 100 + 0 + 100
    assert step["sm_idle_wait_us"] == 100 + 100  # before k2, and after k3 until the step's end
    assert step["copy_us"] == 200
    assert step["kernels"] == 3
    assert step["first_kernel_us"] == 100  # k1 is 100 us long: the first "long" kernel
    assert step["launch_done_us"] == 500
    first = max(step["gaps"], key=lambda g: g["host_us"])
    assert first["idle_us"] == 100 and first["launched_by"] in ("moekit::route_by_expert", "?")
    gap_k2 = next(g for g in step["gaps"] if g["before"] == "k2")
    assert gap_k2["host_us"] == 0 and gap_k2["launched_by"] == "aten::mm" and gap_k2["after"] == "k1"
    text = t.format_timelines("case", [step])
    assert "idle waiting for host" in text and "before k2" in text


def test_no_steps_is_said():
    t = _trace_module()
    assert t.step_timelines({"traceEvents": []}) == []
    assert "no 'ep_step' ranges" in t.format_timelines("case", [])
