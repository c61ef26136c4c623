"""Where the time of an offloaded decode step goes: copy engine, device compute, host.

Builds the model of ``bench_offload.py`` (Mixtral-8x7B config, 4 layers, random bf16 weights),
offloads it with ``--slots`` expert slots and, for each variant below,

1. times greedy decoding ``--repeats`` times, the variants interleaved (A B C A B C ...) so that
   drift of the machine hits them alike; reports the median and the spread of decode tokens/s
   with the strict hit rate, in-flight hit rate, bytes per token and PCIe utilisation;
2. profiles ``--profile-tokens`` decode steps with ``torch.profiler`` (host and device timeline)
   and splits each step's wall time into: the copy stream busy (host-to-device memcpy), the
   device computing while the copy stream idles, and both idle, the last attributed to what the
   host was doing then (waiting for a layer's counts, the engine's own work, the
   ``layer_output`` prediction, or ``transformers``' code such as launching the attention).

Variants marked ``s3`` restore the third session's prefetch timing on this engine instance: a
``layer_output`` prediction read and prefetch chunks issued only while the host waits for a
layer's counts; the others poll between the host's launches (pre-hooks on the decoder layers'
modules, :meth:`OffloadEngine.poll`). (A prefetch victim chosen by lowest predicted mass was
tried in the first session-4 run, commit 4f311f9, lowered the hit rate, and was removed.)

Writes a JSON summary (``--out``) and the gzipped Chrome traces (``--trace-dir``).

    python benchmarks/profile_offload.py --out $OUT/profile.json --trace-dir $OUT/traces
    python benchmarks/profile_offload.py --preset tiny --device cpu --repeats 1   # dry run
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_offload as bench  # noqa: E402

# (name, batch, policy, prefetch, prefetch_extra, lead_chunks, cpu_compute, poll)
VARIANTS = [
    ("lru", 1, "lru", "none", 0, 2, False, True),
    ("lfu", 1, "lfu", "none", 0, 2, False, True),
    ("lru +layer_output s3", 1, "lru", "layer_output", 0, 2, False, False),
    ("lru +layer_output", 1, "lru", "layer_output", 0, 2, False, True),
    ("lru +next_layer s3", 1, "lru", "next_layer", 0, 2, False, False),
    ("lru +next_layer", 1, "lru", "next_layer", 0, 2, False, True),
    ("lfu +layer_output", 1, "lfu", "layer_output", 0, 2, False, True),
    ("lru +next_layer+layer_output", 1, "lru", "next_layer+layer_output", 0, 2, False, True),
    ("lfu +next_layer+layer_output", 1, "lfu", "next_layer+layer_output", 0, 2, False, True),
    ("lru +next_layer+layer_output lead 4", 1, "lru", "next_layer+layer_output", 0, 4, False, True),
    ("lru", 8, "lru", "none", 0, 2, False, True),
    ("lfu", 8, "lfu", "none", 0, 2, False, True),
    ("lfu +cpu", 8, "lfu", "none", 0, 2, True, True),
]


# ----------------------------------------------------------------------------- intervals
def merge(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of ``(start, end)`` intervals, sorted and disjoint."""
    out: list[list[float]] = []
    for a, b in sorted(i for i in iv if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def intersect(x: list, y: list) -> list[tuple[float, float]]:
    """Intersection of two disjoint sorted interval lists."""
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(x: list, y: list) -> list[tuple[float, float]]:
    """``x`` minus ``y`` (both disjoint and sorted)."""
    out = []
    for a, b in x:
        cur = a
        for c, d in y:
            if d <= cur or c >= b:
                continue
            if c > cur:
                out.append((cur, c))
            cur = max(cur, d)
        if cur < b:
            out.append((cur, b))
    return out


def total(iv: list) -> float:
    return sum(b - a for a, b in iv)


# ----------------------------------------------------------------------------- trace analysis
HOST_LABELS = ("offload.wait_counts", "offload.prediction", "offload.engine")


def analyse_trace(events: list[dict], skip_first: int = 1) -> dict:
    """Per decode step (``decode_step`` annotations, the first ``skip_first`` skipped: the
    prefill), milliseconds of: the copy stream busy (``bus``), the device computing while the
    copy stream idles (``compute_only``), both idle split by the host's activity then, the
    number and bytes of host-to-device copies, and the delay from a layer's counts reaching the
    host to its first copy starting. Means over the steps; ``events`` are Chrome-trace events
    (``ph == "X"``, microsecond ``ts`` / ``dur``)."""
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]

    def iv(pred):
        return merge([(e["ts"], e["ts"] + e["dur"]) for e in spans if pred(e)])

    h2d_events = [e for e in spans if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    bus = merge([(e["ts"], e["ts"] + e["dur"]) for e in h2d_events])
    device = iv(lambda e: e.get("cat") in ("kernel", "gpu_memset")
                or (e.get("cat") == "gpu_memcpy" and "HtoD" not in e.get("name", "")))
    host = {label: iv(lambda e, n=label: e.get("cat") == "user_annotation" and e.get("name") == n)
            for label in HOST_LABELS}
    steps = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans
                   if e.get("cat") == "user_annotation" and e.get("name") == "decode_step")[skip_first:]
    waits = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans
                   if e.get("cat") == "user_annotation" and e.get("name") == "offload.wait_counts")
    starts = sorted(e["ts"] for e in h2d_events)
    rows = []
    for a, b in steps:
        win = [(a, b)]
        s_bus = intersect(bus, win)
        s_dev = intersect(device, win)
        idle_bus = subtract(win, s_bus)
        both_idle = subtract(idle_bus, s_dev)
        row = {"step_ms": (b - a) / 1e3, "bus_ms": total(s_bus) / 1e3,
               "compute_only_ms": total(intersect(idle_bus, s_dev)) / 1e3,
               "both_idle_ms": total(both_idle) / 1e3}
        rest = both_idle
        for label in HOST_LABELS:  # wait first: it nests inside the engine's span
            part = intersect(rest, host[label])
            row[f"both_idle_host_in_{label.split('.')[1]}_ms"] = total(part) / 1e3
            rest = subtract(rest, host[label])
        row["both_idle_host_elsewhere_ms"] = total(rest) / 1e3
        inside = [e for e in h2d_events if a <= e["ts"] < b]
        row["h2d_copies"] = len(inside)
        row["h2d_bytes"] = sum(int(e.get("args", {}).get("bytes", 0)) for e in inside)
        delays = []
        for wa, wb in waits:
            if a <= wb < b:
                nxt = next((t for t in starts if t >= wb), None)
                if nxt is not None and nxt - wb < 2000:  # a copy issued right after the counts
                    delays.append((nxt - wb) / 1e3)
        row["counts_to_first_copy_ms"] = statistics.mean(delays) if delays else float("nan")
        row["layers_with_copy_after_counts"] = len(delays)
        rows.append(row)
    if not rows:
        return {"steps": 0}
    out = {"steps": len(rows)}
    for key in rows[0]:
        vals = [r[key] for r in rows if r[key] == r[key]]
        out[key] = statistics.mean(vals) if vals else float("nan")
    out["per_step"] = rows
    return out


# ----------------------------------------------------------------------------- variants
def apply_variant(handle, variant: tuple) -> None:
    """Reconfigure ``handle`` for ``variant``; ``poll`` False restores the third session's
    prefetch timing on this engine instance (no poll between the host's launches)."""
    _, _, policy, prefetch, extra, lead, cpu, poll = variant
    handle.reconfigure(policy=policy, prefetch=prefetch, prefetch_extra=extra, lead_chunks=lead, cpu_compute=cpu)
    engine = handle.engine
    if not poll:
        engine.poll = lambda: None


def annotate(handle, model) -> list:
    """``record_function`` spans around the engine's phases and each forward pass (instance
    attributes wrapping the bound methods; removed by calling the returned undo functions)."""
    from torch.profiler import record_function

    engine = handle.engine
    undo = []

    def wrap(name, label):
        fn = getattr(engine, name)

        def wrapped(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        setattr(engine, name, wrapped)
        undo.append(lambda: engine.__dict__.pop(name, None) if engine.__dict__.get(name) is wrapped else None)

    wrap("forward", "offload.engine")
    wrap("_to_host", "offload.wait_counts")
    wrap("predict_from_output", "offload.prediction")
    wrap("_read_prediction", "offload.prediction")
    state = {}

    def pre(module, args):
        state["rf"] = record_function("decode_step")
        state["rf"].__enter__()

    def post(module, args, out):
        state.pop("rf").__exit__(None, None, None)

    hooks = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    undo += [h.remove for h in hooks]
    return undo


def run_once(model, handle, ids, args) -> dict:
    bench.decode(model, ids, args.warmup_tokens, args.device)
    handle.reset_stats()
    res = bench.decode(model, ids, args.new_tokens, args.device)
    dec = handle.forward_log[1:]
    act = sum(r.activations for r in dec)
    nbytes, secs = sum(r.h2d_bytes for r in dec), sum(r.seconds for r in dec)
    s = handle.stats()
    return {"tok_s": res["decode_tokens_per_s"], "hit": sum(r.hits for r in dec) / act if act else float("nan"),
            "inflight": sum(r.inflight_hits for r in dec) / act if act else float("nan"),
            "bytes_per_token": nbytes / max(1, ids.shape[0] * len(dec)),
            "pcie": nbytes / secs / handle.engine.costs.h2d_bytes_per_s if secs else float("nan"),
            "precision": s["prefetch_precision"], "recall": s["prefetch_recall"], "lead_ms": s["prefetch_lead_s"] * 1e3,
            "prefetch_copies": s["prefetch_copies"], "demand_copies": s["demand_copies"],
            "cpu_computed": s["cpu_computed"], "tokens": res["tokens"]}


def profile_once(model, handle, ids, args, trace_path: str | None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    bench.decode(model, ids, args.warmup_tokens, args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    undo = annotate(handle, model)
    try:
        with profile(activities=activities) as prof:
            bench.decode(model, ids, args.profile_tokens, args.device)
    finally:
        for fn in undo:
            fn()
    fd, tmp = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    prof.export_chrome_trace(tmp)
    with open(tmp) as fh:
        trace = json.load(fh)
    if trace_path:
        with open(tmp, "rb") as src, gzip.open(trace_path, "wb") as dst:
            dst.write(src.read())
    os.remove(tmp)
    return analyse_trace(trace.get("traceEvents", []))


def step_split(doc: dict) -> list[dict]:
    """Per batch-1 variant of a result ``doc``, from the timed (unprofiled) runs' medians: ms
    per decode step, of which the copy stream spends ``needed_copy_ms`` on the misses
    (``activations_per_token * (1 - hit)`` copies: one token needs layers x top-k experts),
    ``wasted_copy_ms`` on prefetch bytes beyond them, and ``not_overlapped_ms`` with no copy
    running."""
    bw = doc["pinned_h2d_bytes_per_s"]
    rows = []
    for key, r in doc["results"].items():
        if not key.endswith("@b1"):
            continue
        runs = r["runs"]
        med = {f: statistics.median([x[f] for x in runs]) for f in ("tok_s", "hit", "bytes_per_token")}
        step = 1e3 / med["tok_s"]
        bus = med["bytes_per_token"] / bw * 1e3
        needed = doc["activations_per_token"] * (1 - med["hit"]) * doc["expert_bytes"] / bw * 1e3
        rows.append(dict(name=key[:-4], step_ms=step, needed_copy_ms=needed, wasted_copy_ms=max(bus - needed, 0.0),
                         not_overlapped_ms=step - bus, hit=med["hit"], tok_s=med["tok_s"],
                         tok_s_min=r["tok_s_min"], tok_s_max=r["tok_s_max"]))
    return rows


def plot(doc: dict, path: str) -> None:
    """Stacked bars: where a batch-1 decode step's time goes per variant (:func:`step_split`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = step_split(doc)
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 2))
    left = [0.0] * len(rows)
    for field, color, label in (("needed_copy_ms", "tab:blue", "copy stream: misses"),
                                ("wasted_copy_ms", "tab:red", "copy stream: prefetch bytes beyond the misses"),
                                ("not_overlapped_ms", "tab:gray", "no copy running")):
        vals = [r[field] for r in rows]
        ax.barh(range(len(rows)), vals, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, vals)]
    for i, r in enumerate(rows):
        ax.text(left[i] + 0.3, i, f"{r['tok_s']:.1f} tok/s [{r['tok_s_min']:.1f}-{r['tok_s_max']:.1f}]  "
                f"hit {r['hit']:.3f}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["name"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left) * 1.45)
    ax.set_xlabel("ms per decode step (batch 1; medians of the interleaved repeats)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3, fontsize=8)
    ax.set_title(f"Where a decode step goes: {doc['device']}, {doc['slots']} expert slots, pinned H2D "
                 f"{doc['pinned_h2d_bytes_per_s'] / 1e9:.1f} GB/s\n(s3 = prefetch read only while the host waits "
                 "for the counts; others poll between the host's launches)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- engine host path
# ops that launch no device kernel (views, allocations, metadata): left out of the op counts
NO_KERNEL = {"aten::slice", "aten::select", "aten::view", "aten::unsqueeze", "aten::reshape", "aten::chunk",
             "aten::split", "aten::narrow", "aten::expand", "aten::as_strided", "aten::_reshape_alias",
             "aten::alias", "aten::detach", "aten::t", "aten::transpose", "aten::lift_fresh", "aten::empty",
             "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::_unsafe_view", "aten::numpy_T",
             "aten::to", "aten::_to_copy", "aten::squeeze", "aten::flatten"}


def engine_host(args) -> dict:
    """Host microseconds and kernel-launching ops per ``OffloadEngine.forward`` call of this
    tree's engine and of ``--baseline`` (an importable earlier moekit), on the CPU, one thread,
    tiny experts (D=64, F=128; 4 layers of 8, top-2): at batch 1 and 8, with every expert
    resident (32 slots: a layer whose experts all hit, where the host sets the pace) and with 16
    slots (misses copied, synchronously on a CPU device). The two engines alternate over
    ``--repeats`` x 200 calls; the op counts come from ``torch.profiler`` (top-level aten ops
    that launch a kernel: on CUDA each is a launch)."""
    import importlib

    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    L, E, D, FF, k = 4, 8, 64, 128, 2
    gen = torch.Generator().manual_seed(0)
    w_in = [torch.randn(E, 2 * FF, D, generator=gen) for _ in range(L)]
    w_out = [torch.randn(E, D, FF, generator=gen) for _ in range(L)]
    out: dict = {}
    for batch in (1, 8):
        for slots in (32, 16):
            x = torch.randn(batch, D, generator=gen)
            routes = [torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(batch)]) for _ in range(200)]
            w = torch.softmax(torch.randn(batch, k, generator=gen), -1)
            engines, times, ops = {}, {}, {}
            for pkg in (args.baseline, "moekit"):
                mod = importlib.import_module(pkg + ".offload")
                costs = mod.TransferCosts(50e9, 3 * FF * D * 4, float("inf"), 0.0)
                engines[pkg] = mod.OffloadEngine(w_in, w_out, slots, "lru", torch.device("cpu"), F.silu, costs)
                for i in range(200):  # warm: the cache holds what it will hold
                    engines[pkg].forward(i % L, x, routes[i], w)
                times[pkg] = []
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for i in range(40):
                        engines[pkg].forward(i % L, x, routes[i], w)
                top = [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
                kernels = [n for n in top if n not in NO_KERNEL]
                ops[pkg] = {"kernel_ops_per_call": len(kernels) / 40, "all_top_level_ops_per_call": len(top) / 40,
                            "kernel_ops": {n: kernels.count(n) / 40 for n in sorted(set(kernels))}}
            for _ in range(args.repeats):
                for pkg, engine in engines.items():
                    t0 = time.perf_counter()
                    for i in range(200):
                        engine.forward(i % L, x, routes[i], w)
                    times[pkg].append((time.perf_counter() - t0) / 200 * 1e6)
            key = f"batch {batch}, {slots} slots" + (" (all resident)" if slots == 32 else " (misses)")
            out[key] = {pkg: dict(us_per_call_median=statistics.median(times[pkg]), us_per_call_min=min(times[pkg]),
                                  **ops[pkg]) for pkg in engines}
            print(f"{key:<32} " + "  ".join(
                f"{pkg}: {out[key][pkg]['us_per_call_median']:6.0f} us (min {out[key][pkg]['us_per_call_min']:5.0f}), "
                f"{out[key][pkg]['kernel_ops_per_call']:5.1f} kernel ops" for pkg in engines), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mixtral-8x7b", choices=sorted(bench.PRESETS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--slots", type=int, default=None, help="expert slots (default: half the experts)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup-tokens", type=int, default=8)
    p.add_argument("--profile-tokens", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    p.add_argument("--out", default=None, help="JSON summary path")
    p.add_argument("--trace-dir", default=None, help="folder for gzipped Chrome traces")
    p.add_argument("--plot", default=None, metavar="JSON", help="only draw the PNG of an existing result file")
    p.add_argument("--engine-host", action="store_true",
                   help="only the engine's host path on the CPU, this tree against --baseline (engine_host)")
    p.add_argument("--baseline", default="moekit_s5", help="--engine-host: the importable earlier moekit")
    args = p.parse_args(argv)
    if args.engine_host:
        doc = {"command": " ".join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
               "versions": bench._versions(), "baseline": args.baseline, "results": engine_host(args)}
        if args.out:
            _write_json(doc, args.out)
        return 0
    if args.plot:
        return bench.redraw(args.plot, plot)
    from moekit.offload import offload

    torch.manual_seed(0)
    bw = bench.measure_bandwidth(args.device)["pinned_h2d_bytes_per_s"]
    model = bench.build_model(bench.PRESETS[args.preset], args.layers, args.device)
    n_total = sum(b.mlp.experts.gate_up_proj.shape[0] for b in model.model.layers)
    model.to("cpu")
    if args.device == "cuda":
        torch.cuda.empty_cache()
    slots = args.slots or n_total // 2
    handle = offload(model, cache_experts=slots, device=args.device)
    variants = [v for v in VARIANTS if args.only is None or v[0] in args.only.split(",")]
    results: dict = {f"{v[0]} @b{v[1]}": {"runs": []} for v in variants}
    ref_tokens: dict = {}
    t0 = time.perf_counter()
    apply_variant(handle, variants[0])  # untimed: first-call costs (allocations, kernel loading) stay out
    run_once(model, handle, bench.prompts(variants[0][1], args.prompt_len, model.config.vocab_size), args)
    for rep in range(args.repeats):
        for v in variants:
            key = f"{v[0]} @b{v[1]}"
            apply_variant(handle, v)
            ids = bench.prompts(v[1], args.prompt_len, model.config.vocab_size)
            run = run_once(model, handle, ids, args)
            tokens = run.pop("tokens")
            if not v[6]:  # every variant without CPU compute must decode the same tokens
                ref = ref_tokens.setdefault(v[1], tokens)
                run["tokens_identical"] = bool(torch.equal(ref, tokens))
            results[key]["runs"].append(run)
            print(f"[{time.perf_counter() - t0:6.1f}s] rep {rep} {key:<42} {run['tok_s']:7.2f} tok/s hit {run['hit']:.3f} "
                  f"inflight {run['inflight']:.3f} pcie {run['pcie']:.2f} lead {run['lead_ms']:.2f}ms", flush=True)
    if args.trace_dir:
        os.makedirs(args.trace_dir, exist_ok=True)
    for v in variants:
        key = f"{v[0]} @b{v[1]}"
        apply_variant(handle, v)
        ids = bench.prompts(v[1], args.prompt_len, model.config.vocab_size)
        name = "".join(ch if ch.isalnum() else "_" for ch in key).strip("_")
        try:
            results[key]["profile"] = profile_once(
                model, handle, ids, args, os.path.join(args.trace_dir, f"{name}.json.gz") if args.trace_dir else None)
        except Exception as exc:  # keep the timings of a one-shot device run
            results[key]["profile"] = {"error": repr(exc)}
        prof = results[key]["profile"]
        print(f"profile {key}: " + " ".join(f"{k}={val:.2f}" for k, val in prof.items()
                                            if isinstance(val, float)), flush=True)
    for key, r in results.items():
        runs = r["runs"]
        for field in ("tok_s", "hit", "inflight", "bytes_per_token", "pcie"):
            vals = [x[field] for x in runs]
            r[f"{field}_median"] = statistics.median(vals)
            r[f"{field}_min"], r[f"{field}_max"] = min(vals), max(vals)
    doc = {"command": " ".join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "pinned_h2d_bytes_per_s": bw,
           "slots": slots, "expert_bytes": handle.engine.expert_bytes,
           "activations_per_token": args.layers * model.config.num_experts_per_tok, "versions": bench._versions(), "variants": [list(v) for v in variants], "results": results}
    print(f"\n{'variant':<46} {'tok/s med [min-max]':>22} {'hit':>6} {'infl':>5} {'pcie':>5} {'bus':>6} {'cmp':>6} "
          f"{'idle':>6} {'wait':>5} {'eng':>5} {'pred':>5} {'else':>5} {'react':>6}")
    for key, r in results.items():
        pr = r.get("profile", {})
        cols = [pr.get(c, float("nan")) for c in ("step_ms", "bus_ms", "compute_only_ms", "both_idle_ms",
                                                  "both_idle_host_in_wait_counts_ms", "both_idle_host_in_engine_ms",
                                                  "both_idle_host_in_prediction_ms", "both_idle_host_elsewhere_ms",
                                                  "counts_to_first_copy_ms")]
        print(f"{key:<46} {r['tok_s_median']:7.2f} [{r['tok_s_min']:6.2f}-{r['tok_s_max']:6.2f}] {r['hit_median']:6.3f} "
              f"{r['inflight_median']:5.3f} {r['pcie_median']:5.2f} " + " ".join(f"{c:5.2f}" for c in cols[1:]))
    if args.out:
        _write_json(doc, args.out)
    return 0


def _write_json(doc: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=2, default=float)
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
