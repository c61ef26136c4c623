"""Expert placement: moekit's planner against moekit's rewrite of EPLB, in the same run.

On seeded synthetic routing traces (skewed per-layer popularity, slow drift, per-step noise,
bursts) for DeepSeek-V3-like (58 layers x 256 experts, top-8) and Qwen3-like (48 x 128, top-8)
models, replanning every ``--window`` steps and scoring each plan on the *next* window:

- next-window balancedness (DESIGN.md), moves per replan, nodes per group;
- plan time per call on one thread (median of repeated calls on one fixed load);
- the movement-aware trade-off over the price per move;
- the optimality gap of the heuristic against the exact ILP (highspy) on small layers.

    python benchmarks/bench_placement.py            # writes benchmarks/results/placement_cpu_<date>.json
    python benchmarks/bench_placement.py --ideas --seeds 1,2   # robust-planning ideas (issue 4's +0.01
                                                    # goal), on traces other than the scored ones

The published reference figure for EPLB's own implementation (about 250 ms per call for
58 x 256 on one CPU core, from the issue) cannot be re-measured here (EPLB's code is not a
dependency); the goals are checked against it and against the rewrite measured in this run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from moekit.metrics import balancedness  # noqa: E402
from moekit.placement import PlacementConfig, ReplanConfig, plan, predict_load, rolling_evaluation, solve_exact  # noqa: E402
from moekit.placement.packing import swap_search  # noqa: E402
from moekit.placement.replication import row_counts  # noqa: E402
from moekit.trace import synthetic_trace  # noqa: E402

EPLB_REFERENCE_MS = 250.0    # published figure for EPLB's implementation, 58 x 256, one core
CONFIGS = {
    "V3 288/32/4n/8g": dict(layers=58, experts=256, config=PlacementConfig(288, 8, 4, 32)),
    "V3 320/64/8n/8g": dict(layers=58, experts=256, config=PlacementConfig(320, 8, 8, 64)),
    "Qwen3 136/8 (+8)": dict(layers=48, experts=128, config=PlacementConfig(136, 1, 1, 8)),
    "Qwen3 144/8 (+16)": dict(layers=48, experts=128, config=PlacementConfig(144, 1, 1, 8)),
}
PRICES = (0.001, 0.003, 0.01, 0.03)


def _machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _versions() -> dict:
    import highspy

    import moekit

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "highspy": getattr(highspy.Highs(), "version", lambda: "?")(),
            "moekit": getattr(moekit, "__version__", "?")}


def _time_plan(load, config, algorithm, repeats, previous=None) -> dict:
    plan(load, config, previous, algorithm=algorithm)            # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        plan(load, config, previous, algorithm=algorithm)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"wall_ms_median": 1e3 * float(np.median(wall)), "wall_ms_min": 1e3 * float(np.min(wall)),
            "cpu_ms_median": 1e3 * float(np.median(cpu))}


def _runs(name: str) -> list[tuple[str, dict]]:
    runs = [
        ("eplb (last window)", dict(algorithm="eplb", predictor="last")),
        ("eplb (EMA)", dict(algorithm="eplb", predictor="ema")),
        ("moekit (last window)", dict(algorithm="moekit", predictor="last")),
        ("moekit (EMA)", dict(algorithm="moekit", predictor="ema")),
        ("moekit (EMA, previous)", dict(algorithm="moekit", predictor="ema", use_previous=True)),
        ("oracle: eplb on scored window", dict(algorithm="eplb", oracle=True)),
        ("oracle: moekit on scored window", dict(algorithm="moekit", oracle=True)),
    ]
    if CONFIGS[name]["config"].hierarchical:
        runs.append(("moekit (EMA), groups may span nodes", dict(algorithm="moekit", predictor="ema", global_=True)))
    runs += [(f"moekit (EMA, previous, price {p})", dict(algorithm="moekit", predictor="ema", use_previous=True,
                                                        replan=ReplanConfig(move_price=p))) for p in PRICES]
    return runs


def _ilp_gaps(console: Console, cases: list[tuple[int, int, int, int]], time_limit: float) -> list[dict]:
    rows = []
    for E, P, R, seeds in cases:
        config = PlacementConfig(R, 1, 1, P)
        for seed in range(seeds):
            w = np.random.default_rng(1000 + seed).lognormal(0.0, 1.0, E)
            t0 = time.perf_counter()
            res = solve_exact(w, config, time_limit=time_limit)
            ilp_s = time.perf_counter() - t0
            ours = float(plan(w, config).gpu_load.max())
            eplb = float(plan(w, config, algorithm="eplb").gpu_load.max())
            rows.append({"E": E, "P": P, "R": R, "seed": seed, "optimal": bool(res.optimal),
                         "ilp_max": res.max_load, "lower_bound": res.lower_bound, "moekit_max": ours,
                         "eplb_max": eplb, "gap_moekit": ours / res.max_load - 1,
                         "gap_eplb": eplb / res.max_load - 1, "ilp_seconds": ilp_s})
    return rows


# --- ideas for the +0.01 goal (side study; none became the default, see docs/results/placement.md)

IDEA_HALFLIVES = (2.0, 3.0, 5.0, 8.0, 12.0)
IDEA_REL_SIGMA = 0.19   # log-error std of the EMA's next-window prediction, measured on dev seed 1


def _log_ema(counts_TLE: np.ndarray, window: int, halflife: float = 5.0, clip: float = 1.5) -> np.ndarray:
    """EMA of log counts with each step's residual clipped at ``clip`` (5 sd of the trace's step
    noise; a x4 burst step, +1.39 plus noise, is cut only in part), scaled to ``window`` steps of
    the last step's total. In the log domain a burst step weighs like any other step, where the
    count EMA lets it add up to 3x its weight."""
    y = np.log(counts_TLE + 0.5)
    k = 1 - 0.5 ** (1 / halflife)
    m = np.median(y[:3], axis=0)
    for t in range(min(3, len(y)), len(y)):
        m = m + k * np.clip(y[t] - m, -clip, clip)
    p = np.exp(m)
    return p / p.sum(axis=1, keepdims=True) * counts_TLE[-1].sum(axis=1, keepdims=True) * window


def _hedged(load_LE: np.ndarray, config: PlacementConfig, risk: float) -> np.ndarray:
    """moekit's plan, then a swap search (within each node) that lowers the highest
    ``load + risk * sd`` of a GPU, with independent relative errors of ``IDEA_REL_SIGMA`` plus
    Poisson noise per expert: volatile heavy replicas get spread and leave headroom."""
    p2l = plan(load_LE, config).phy2log.numpy()
    num_layers, num_slots = p2l.shape
    nodes = config.num_nodes if config.hierarchical else 1
    cnt = row_counts(p2l, load_LE.shape[1])
    var_LE = (IDEA_REL_SIGMA * load_LE) ** 2 + load_LE
    rw = np.take_along_axis(load_LE / cnt, p2l, axis=1).reshape(num_layers * nodes, -1)
    rv = np.take_along_axis(var_LE / cnt ** 2, p2l, axis=1).reshape(num_layers * nodes, -1)
    key = p2l.reshape(num_layers * nodes, -1)
    items = np.broadcast_to(np.arange(key.shape[1]), key.shape).reshape(key.shape[0], -1, config.slots_per_gpu)
    items = swap_search(items, rw, key, load_LE.shape[1], var_BN=rv, risk=risk)
    return np.take_along_axis(key, items.reshape(key.shape[0], -1), axis=1).reshape(num_layers, num_slots)


def _idea_runs(counts_TLE: np.ndarray, config: PlacementConfig, window: int) -> dict[str, float]:
    """Mean next-window balancedness of each idea, planned on window t, scored on t + 1."""
    ema = lambda h, hl=5.0: predict_load(h, method="ema", window=window, halflife=hl)  # noqa: E731
    ideas = {
        "eplb (last window)": lambda h: plan(predict_load(h, method="last", window=window), config,
                                             algorithm="eplb").phy2log,
        "moekit (EMA 5)": lambda h: plan(ema(h), config).phy2log,
        "shrink: 0.8 EMA + 0.2 long-run mean": lambda h: plan(0.8 * ema(h) + 0.2 * h.mean(0) * window,
                                                             config).phy2log,
        "burst-robust log-EMA (clip 1.5)": lambda h: plan(_log_ema(h, window), config).phy2log,
        "variance-aware packing, risk 1": lambda h: _hedged(ema(h), config, 1.0),
        "variance-aware packing, risk 2": lambda h: _hedged(ema(h), config, 2.0),
    }
    num_windows = counts_TLE.shape[0] // window
    scores: dict[str, list[float]] = {k: [] for k in [*ideas, "half-life picked on past windows"]}
    past = {hl: [] for hl in IDEA_HALFLIVES}   # each half-life's score on windows already seen
    for t in range(num_windows - 1):
        hist = counts_TLE[:(t + 1) * window]
        future = counts_TLE[(t + 1) * window:(t + 2) * window].sum(axis=0)
        for label, fn in ideas.items():
            scores[label].append(balancedness(future, fn(hist), config.num_gpus))
        # idea 4: use the half-life that scored best on the windows scored so far (no peeking)
        best = max(IDEA_HALFLIVES, key=lambda hl: np.mean(past[hl]) if past[hl] else float(hl == 5.0))
        plans = {hl: plan(ema(hist, hl), config).phy2log for hl in IDEA_HALFLIVES}
        scores["half-life picked on past windows"].append(balancedness(future, plans[best], config.num_gpus))
        for hl, p2l in plans.items():
            past[hl].append(balancedness(future, p2l, config.num_gpus))
    return {k: float(np.mean(v)) for k, v in scores.items()}


def ideas_main(args, console: Console) -> int:
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {"ideas": {}}
    for name, spec in CONFIGS.items():
        for kind in ("zipf", "lognormal"):
            for seed in seeds:
                tr = synthetic_trace(args.steps, spec["layers"], spec["experts"], 8, args.tokens,
                                     popularity=kind, seed=seed)
                res = _idea_runs(tr.counts, spec["config"], args.window)
                results["ideas"][f"{name} | {kind} | seed {seed}"] = res
                base = res["eplb (last window)"]
                console.print(f"{name} | {kind} | seed {seed}: eplb {base:.4f}; "
                              + ", ".join(f"{k}: {v - base:+.4f}" for k, v in res.items() if not k.startswith("eplb")))
    settings = {"steps": args.steps, "window": args.window, "tokens_per_step": args.tokens,
                "seeds": seeds, "rel_sigma": IDEA_REL_SIGMA, "halflives": IDEA_HALFLIVES}
    _save(results, settings, args.out, "placement_ideas_cpu", _plot_ideas, console)
    return 0


def _plot_ideas(results: dict, path: str) -> None:
    """One bar group per config / trace: each idea's next-window balancedness minus EPLB's,
    averaged over the seeds, with the issue's +0.01 goal as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    by: dict = {}
    for key, res in results["ideas"].items():
        name, kind, _ = key.split(" | ")
        for label, val in res.items():
            if label != "eplb (last window)":
                by.setdefault(f"{name}\n{kind}", {}).setdefault(label, []).append(val - res["eplb (last window)"])
    groups = list(by)
    labels = list(by[groups[0]])
    fig, ax = plt.subplots(figsize=(13, 4.5))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        ax.bar(np.arange(len(groups)) + (i - (len(labels) - 1) / 2) * width,
               [np.mean(by[g][label]) for g in groups], width, label=label)
    ax.axhline(0.01, color="k", ls="--", lw=1, label="goal: +0.01 over EPLB")
    ax.set_xticks(np.arange(len(groups)), groups, fontsize=8)
    ax.set_ylabel("next-window balancedness - EPLB (last window)")
    seeds = results["settings"]["seeds"]
    ax.set_title(f"robust-planning ideas vs EPLB, mean over trace seeds {seeds}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 0.012)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7.5, ncol=4, loc="lower center")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _save(results: dict, settings: dict, out: str | None, stem: str, plot, console: Console) -> None:
    """Add the command, date, machine and versions; write the JSON atomically and its PNG."""
    results.update({"command": " ".join([sys.executable, *sys.argv]),
                    "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "machine": _machine(), "versions": _versions(), "settings": settings})
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                              f"{stem}_{datetime.date.today().isoformat()}.json")
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)), suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(results, fh, indent=1)
    os.replace(tmp, out)
    plot(results, out.replace(".json", ".png"))
    console.print(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="trace steps (default 200)")
    ap.add_argument("--window", type=int, default=10, help="steps per planning window (default 10)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (default 4096)")
    ap.add_argument("--repeats", type=int, default=15, help="timed plan calls per config")
    ap.add_argument("--ilp-time-limit", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="tiny run to check the script")
    ap.add_argument("--out", default=None, help="result file (default benchmarks/results/placement_cpu_<date>.json)")
    ap.add_argument("--ideas", action="store_true",
                    help="side study of robust-planning ideas (writes placement_ideas_cpu_<date>.json)")
    ap.add_argument("--seeds", default="1,2", help="trace seeds for --ideas (the main run uses seed 0)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    console = Console(width=150)
    if args.ideas:
        return ideas_main(args, console)
    configs = dict(list(CONFIGS.items())[:1]) if args.quick else CONFIGS
    traces = ("zipf",) if args.quick else ("zipf", "lognormal")
    results: dict = {"configs": {}, "timing": {}, "ilp": [], "eplb_duplicates": {}}
    with Progress(console=console, transient=True) as progress:
        total = sum(len(_runs(n)) for n in configs) * len(traces)
        task = progress.add_task("rolling evaluations", total=total)
        for name, spec in configs.items():
            config = spec["config"]
            for kind in traces:
                tr = synthetic_trace(args.steps, spec["layers"], spec["experts"], 8, args.tokens,
                                     popularity=kind, seed=0)
                key = f"{name} | {kind}"
                results["configs"][key] = {"config": config.to_dict(), "layers": spec["layers"],
                                           "experts": spec["experts"], "trace": tr.metadata, "runs": {}}
                for label, kw in _runs(name):
                    kw = dict(kw)
                    cfg = config
                    if kw.pop("global_", False):
                        cfg = PlacementConfig(config.num_replicas, config.num_groups, config.num_nodes,
                                              config.num_gpus, keep_groups_on_nodes=False)
                    res = rolling_evaluation(tr.counts, cfg, window=args.window, halflife=5.0, **kw)
                    results["configs"][key]["runs"][label] = res.summary()
                    progress.advance(task)
            # timing on one fixed load (the first trace's first window), one thread
            tr = synthetic_trace(args.window * 2, spec["layers"], spec["experts"], 8, args.tokens, seed=0)
            load = predict_load(tr.counts[:args.window], method="last", window=args.window)
            prev = plan(predict_load(tr.counts[args.window:], method="last", window=args.window), config)
            eplb_p2l = plan(load, config, algorithm="eplb").phy2log.numpy().reshape(spec["layers"], config.num_gpus, -1)
            srt = np.sort(eplb_p2l, axis=2)
            dup = (srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2)
            results["eplb_duplicates"][name] = {"gpu_layer_pairs_with_two_replicas_of_one_expert": float(dup.mean()),
                                                "layers_affected": float(dup.any(axis=1).mean())}
            results["timing"][name] = {
                "eplb": _time_plan(load, config, "eplb", args.repeats),
                "moekit": _time_plan(load, config, "moekit", args.repeats),
                "moekit_previous": _time_plan(load, config, "moekit", args.repeats, prev),
            }
    cases = [(6, 3, 9, 2)] if args.quick else [(6, 3, 9, 8), (8, 4, 12, 6), (8, 2, 10, 6)]
    results["ilp"] = _ilp_gaps(console, cases, args.ilp_time_limit)

    _print_tables(console, results)
    for name, d in results["eplb_duplicates"].items():
        console.print(f"{name}: EPLB puts two replicas of one expert on one GPU in "
                      f"{100 * d['gpu_layer_pairs_with_two_replicas_of_one_expert']:.2f}% of (layer, GPU) pairs, "
                      f"{100 * d['layers_affected']:.0f}% of layers (moekit: never)")
    results["goals"] = _goals(results)
    for line in results["goals"]["lines"]:
        console.print(line)
    settings = {"steps": args.steps, "window": args.window, "tokens_per_step": args.tokens,
                "top_k": 8, "ema_halflife_steps": 5.0, "repeats": args.repeats,
                "eplb_reference_ms_published": EPLB_REFERENCE_MS}
    _save(results, settings, args.out, "placement_cpu", _plot, console)
    return 0


def _print_tables(console: Console, results: dict) -> None:
    for key, entry in results["configs"].items():
        t = Table(title=f"{key}: replan every window, score on the next")
        for col in ("run", "next-window bal.", "min", "planned bal.", "moves/replan", "% slots", "nodes/group"):
            t.add_column(col, justify="right" if col != "run" else "left")
        eplb_moves = entry["runs"]["eplb (last window)"]["moves_per_replan"]
        for label, s in entry["runs"].items():
            t.add_row(label, f"{s['balancedness']:.4f}", f"{s['balancedness_min']:.4f}",
                      f"{s['planned_balancedness']:.4f}",
                      f"{s['moves_per_replan']:.0f} ({s['moves_per_replan'] / max(eplb_moves, 1):.0%})",
                      f"{100 * s['moved_slot_share']:.1f}", f"{s['nodes_per_group']:.2f}")
        console.print(t)
    t = Table(title="plan time per call, one thread, median wall (CPU) ms; published EPLB reference ~250 ms for 58x256")
    for col in ("config", "eplb rewrite", "moekit", "moekit+previous", "moekit / eplb rewrite",
                "reference / moekit"):
        t.add_column(col, justify="right" if col != "config" else "left")
    for name, tm in results["timing"].items():
        e, m, p = (tm[k]["wall_ms_median"] for k in ("eplb", "moekit", "moekit_previous"))
        ec, mc, pc = (tm[k]["cpu_ms_median"] for k in ("eplb", "moekit", "moekit_previous"))
        t.add_row(name, f"{e:.1f} ({ec:.1f})", f"{m:.1f} ({mc:.1f})", f"{p:.1f} ({pc:.1f})", f"{m / e:.2f}x",
                  f"{EPLB_REFERENCE_MS / m:.1f}x")
    console.print(t)
    t = Table(title="heaviest GPU vs the exact ILP (highspy), small layers")
    for col in ("E/P/R", "cases", "proven optimal", "moekit gap mean", "moekit gap max", "eplb gap mean"):
        t.add_column(col, justify="right")
    by: dict = {}
    for r in results["ilp"]:
        by.setdefault((r["E"], r["P"], r["R"]), []).append(r)
    for (E, P, R), rows in by.items():
        t.add_row(f"{E}/{P}/{R}", str(len(rows)), str(sum(r["optimal"] for r in rows)),
                  f"{np.mean([r['gap_moekit'] for r in rows]):.2%}", f"{np.max([r['gap_moekit'] for r in rows]):.2%}",
                  f"{np.mean([r['gap_eplb'] for r in rows]):.2%}")
    console.print(t)


def _goals(results: dict) -> dict:
    lines, ok = [], {}
    bal_ok, plus_ok = True, True
    move_ok = True
    for key, entry in results["configs"].items():
        r = entry["runs"]
        e, m = r["eplb (last window)"], r["moekit (EMA)"]
        mp = r["moekit (EMA, previous)"]
        d = m["balancedness"] - e["balancedness"]
        bal_ok &= d >= 0
        if e["balancedness"] < 0.95:
            plus_ok &= d >= 0.01
        ratio = mp["moves_per_replan"] / max(e["moves_per_replan"], 1)
        change = mp["balancedness"] / m["balancedness"] - 1
        move_ok &= ratio <= 0.2 and change >= -0.01
        lines.append(f"{key}: moekit - eplb = {d:+.4f} (eplb {e['balancedness']:.4f}); with previous: "
                     f"{ratio:.0%} of eplb's moves, balancedness {100 * change:+.2f}% vs moekit fresh, "
                     f"{mp['balancedness'] - e['balancedness']:+.4f} vs eplb")
    # one thread: on a machine shared with other jobs the process CPU time is the figure that
    # matches "one CPU core"; wall time is reported beside it
    speed = {name: (EPLB_REFERENCE_MS / tm["moekit"]["wall_ms_median"], EPLB_REFERENCE_MS / tm["moekit"]["cpu_ms_median"])
             for name, tm in results["timing"].items() if name.startswith("V3")}
    ok["balancedness_at_least_eplb"] = bool(bal_ok)
    ok["plus_0.01_where_eplb_below_0.95"] = bool(plus_ok)
    ok["5x_faster_than_reference_250ms_wall"] = bool(all(w >= 5 for w, _ in speed.values()))
    ok["5x_faster_than_reference_250ms_cpu"] = bool(all(c >= 5 for _, c in speed.values()))
    ok["previous_20pct_moves_1pct_balance"] = bool(move_ok)
    lines.append("speed vs published 250 ms (wall / CPU time): "
                 + ", ".join(f"{k}: {w:.1f}x / {c:.1f}x" for k, (w, c) in speed.items()))
    lines += [f"goal {k}: {'MET' if v else 'NOT MET'}" for k, v in ok.items()]
    return {"met": ok, "lines": lines}


def _plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = list(results["configs"])
    ncols = min(4, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.0 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        runs = results["configs"][key]["runs"]
        for label, s in runs.items():
            if "price" in label or label.startswith("oracle"):
                continue
            ax.scatter(100 * s["moved_slot_share"], s["balancedness"], label=label, s=40)
        curve = [(100 * runs[f"moekit (EMA, previous, price {p})"]["moved_slot_share"],
                  runs[f"moekit (EMA, previous, price {p})"]["balancedness"]) for p in PRICES]
        ax.plot(*zip(*curve), "k.--", lw=0.8, label="moekit previous, price sweep")
        for label in ("oracle: eplb on scored window",):
            ax.axhline(runs[label]["balancedness"], color="grey", lw=0.8, ls=":", label=label)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("slots receiving a copied expert per replan (%)")
        ax.set_ylabel("next-window balancedness")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=8, fontsize=7.5)
    fig.suptitle("next-window balancedness vs experts copied per replan (synthetic drifting traces)")
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.subplots_adjust(bottom=0.14)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
