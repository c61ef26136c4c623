"""Where a synced expert-parallel step's GPU time goes, read from a torch.profiler chrome trace.

``bench_ep.py --profile`` records a few steps of a case, each inside a ``record_function``
range named :data:`STEP` that ends after a device sync (so the range spans the step's GPU
work, as the per-step-synced timing does), exports the trace and summarises it here:

- ``sm_busy_us``: the union of the step's kernels, barrier kernels left out (a copy-engine
  exchange's one-block barrier spins while it waits for the peer: that is not expert work);
- ``sm_idle_host_us``: idle SM time (no kernel running) before a kernel whose launch call
  returned only later, i.e. the GPU waited for the host to launch it. For a gap ``[a, b)``
  before a kernel whose launch call ended at ``l``: ``min(b, l) - a`` (clipped at 0) is
  host-bound, the rest waited for something else (an event of another stream, an exchange, a
  barrier, the peer rank);
- ``sm_idle_wait_us``: the rest of the idle time;
- ``copy_us``: the union of the copy engines' work (memcpys), beside or between kernels;
- ``first_kernel_us``: from the step's start to its first kernel of at least
  ``long_kernel_us`` (the first expert GEMM), and ``launch_done_us``: to the host's last launch;
- ``gaps``: the longest idle stretches, each with the kernels around it and the host op that
  launched the next one.

Times are microseconds of the trace's clock. The profiler adds host time to every op, so the
host-bound share it shows is an upper bound for an unprofiled step; the rank profiled is rank 0.
"""

from __future__ import annotations

__all__ = ["STEP", "step_timelines", "format_timelines"]

STEP = "ep_step"
_GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, merged ``[start, end)`` intervals."""
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _total(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _launchers(events: list[dict]) -> tuple[dict[int, dict], list[dict]]:
    """Launch calls by correlation id, and the host ops (``cpu_op``) by start time."""
    launch = {e["args"]["correlation"]: e for e in events
              if e.get("cat") in _LAUNCH_CATS and "correlation" in e.get("args", {})}
    ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    return launch, ops


def _host_op(ops: list[dict], call: dict | None) -> str:
    """Name of the innermost host op (same thread) around a launch call, ``"?"`` if none."""
    if call is None:
        return "?"
    best = None
    for op in ops:
        if op["ts"] > call["ts"]:
            break
        if op.get("tid") == call.get("tid") and op["ts"] + op["dur"] >= call["ts"] + call["dur"]:
            if best is None or op["dur"] <= best["dur"]:
                best = op
    return best["name"] if best else "?"


def step_timelines(trace: dict, long_kernel_us: float = 50.0, top: int = 6) -> list[dict]:
    """One summary per :data:`STEP` range of ``trace`` (a chrome trace as exported by
    ``torch.profiler``): the fields of the module docstring, in microseconds."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    steps = sorted((e for e in events if e.get("cat") == "user_annotation" and e.get("name") == STEP),
                   key=lambda e: e["ts"])
    launch, ops = _launchers(events)
    gpu = [e for e in events if e.get("cat") in _GPU_CATS]
    out = []
    for step in steps:
        t0, t1 = step["ts"], step["ts"] + step["dur"]
        mine = sorted((e for e in gpu if t0 <= e["ts"] < t1), key=lambda e: e["ts"])
        kernels = [e for e in mine if e["cat"] == "kernel" and "barrier" not in e["name"].lower()]
        busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
        copies = _union([(e["ts"], e["ts"] + e["dur"]) for e in mine if e["cat"] == "gpu_memcpy"])
        host_idle, gaps, prev_end, prev_name = 0.0, [], t0, "(step start)"
        for k in kernels:
            end = k["ts"] + k["dur"]
            if k["ts"] > prev_end:  # the SMs idle in [prev_end, k.ts)
                call = launch.get(k.get("args", {}).get("correlation"))
                launched = call["ts"] + call["dur"] if call else prev_end
                host = max(0.0, min(k["ts"], launched) - prev_end)
                host_idle += host
                gaps.append({"at_us": prev_end - t0, "idle_us": k["ts"] - prev_end, "host_us": host,
                             "after": prev_name, "before": k["name"], "launched_by": _host_op(ops, call)})
            if end > prev_end:
                prev_end, prev_name = end, k["name"]
        idle = (t1 - t0) - _total(busy)
        long = next((k for k in kernels if k["dur"] >= long_kernel_us), None)
        calls = [launch[c] for c in (e.get("args", {}).get("correlation") for e in mine) if c in launch]
        out.append({
            "step_us": t1 - t0,
            "sm_busy_us": _total(busy),
            "sm_idle_host_us": host_idle,
            "sm_idle_wait_us": idle - host_idle,
            "copy_us": _total(copies),
            "kernels": len(kernels),
            "first_kernel_us": (long["ts"] - t0) if long else None,
            "launch_done_us": max((c["ts"] + c["dur"] - t0 for c in calls), default=None),
            "gaps": sorted(gaps, key=lambda g: -g["idle_us"])[:top],
        })
    return out


def format_timelines(label: str, steps: list[dict]) -> str:
    """A readable block: one line per step, then the longest gaps of the last one."""
    if not steps:
        return f"{label}: no '{STEP}' ranges in the trace\n"
    lines = [f"{label}: {len(steps)} synced steps (us; SM idle = no kernel running, barriers left out)"]
    for s in steps:
        first = f"{s['first_kernel_us']:.0f}" if s["first_kernel_us"] is not None else "-"
        launched = f"{s['launch_done_us']:.0f}" if s["launch_done_us"] is not None else "-"
        lines.append(f"  step {s['step_us']:8.0f} | SM busy {s['sm_busy_us']:8.0f} | idle waiting for host "
                     f"{s['sm_idle_host_us']:7.0f} | idle waiting otherwise {s['sm_idle_wait_us']:7.0f} | copies "
                     f"{s['copy_us']:6.0f} | first long kernel at {first} | host launched all by {launched} | "
                     f"{s['kernels']} kernels")
    lines.append("  longest idle stretches of the last step:")
    for g in steps[-1]["gaps"]:
        lines.append(f"    at {g['at_us']:7.0f} idle {g['idle_us']:6.0f} (host {g['host_us']:6.0f}): after "
                     f"{g['after'][:50]} | before {g['before'][:50]} | launched by {g['launched_by'][:60]}")
    return "\n".join(lines) + "\n"
