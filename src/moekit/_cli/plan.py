"""``moekit plan``: plan expert placement from a routing trace or a load file.

    moekit plan --trace t.npz --replicas 288 --groups 8 --nodes 4 --gpus 32 -o plan.json
    moekit plan --load load.json --replicas 288 --gpus 32 --previous old.json -o plan.json
    moekit plan --evaluate --trace t.npz --replicas 288 --groups 8 --nodes 4 --gpus 32 --window 10
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="plan expert placement (EPLB-compatible) from a routing trace or a load file",
        description="Replicate hot experts and pack them onto GPUs; print balancedness and moves. "
        "With --evaluate, replan every --window steps of the trace and score each plan on the "
        "next window.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="routing trace .npz (counts [steps, layers, experts])")
    src.add_argument("--load", help="JSON load: [[...] per layer] or {\"load\": [[...]]}")
    p.add_argument("--replicas", type=int, required=True, help="physical expert slots per layer (R)")
    p.add_argument("--groups", type=int, default=1, help="expert groups (G), default 1")
    p.add_argument("--nodes", type=int, default=1, help="nodes (N), default 1")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (P), R must be a multiple of P")
    p.add_argument("--previous", help="plan.json in service: replan moving few experts")
    p.add_argument("-o", "--output", help="write the plan (or, with --evaluate, the results) as JSON")
    p.add_argument("--algorithm", choices=("moekit", "eplb"), default="moekit")
    p.add_argument("--predictor", choices=("ema", "last"), default="ema",
                   help="load of the next window from a trace: EMA (default) or the last window")
    p.add_argument("--window", type=int, default=None,
                   help="steps per window (default: the whole trace; --evaluate: 10)")
    p.add_argument("--halflife", type=float, default=5.0, help="EMA half-life in steps (default 5)")
    p.add_argument("--move-price", type=float, default=None,
                   help="cost of one expert copy in units of the mean GPU load (default 0.003)")
    p.add_argument("--evaluate", action="store_true", help="rolling evaluation over the trace")
    p.add_argument("--movement-aware", action="store_true",
                   help="with --evaluate: hand every replan the plan in service")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console
    from rich.progress import Progress

    from moekit.placement import PlacementConfig, Plan, ReplanConfig, plan, predict_load, rolling_evaluation
    from moekit.placement.files import read_load, write_json
    from moekit.trace import load_trace

    console = Console()
    config = PlacementConfig(args.replicas, args.groups, args.nodes, args.gpus)
    replan = ReplanConfig() if args.move_price is None else ReplanConfig(move_price=args.move_price)
    if args.window is not None and args.window < 1:
        raise ValueError(f"--window: expected a positive number of steps, got {args.window}")
    if args.evaluate:
        if args.trace is None:
            raise ValueError("--evaluate: expected --trace (a load file has no windows)")
        trace = load_trace(args.trace)
        window = args.window or 10
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("replanning", total=None)
            result = rolling_evaluation(
                trace.counts, config, window=window, algorithm=args.algorithm,
                predictor=args.predictor if args.algorithm == "moekit" else "last",
                halflife=args.halflife, use_previous=args.movement_aware, replan=replan,
                on_replan=lambda i, n: progress.update(task, completed=i, total=n),
            )
        s = result.summary()
        console.print(
            f"{args.algorithm}: next-window balancedness {s['balancedness']:.4f} "
            f"(min {s['balancedness_min']:.4f}, planned {s['planned_balancedness']:.4f}), "
            f"moves/replan {s['moves_per_replan']:.0f} ({100 * s['moved_slot_share']:.1f}% of slots), "
            f"plan {s['plan_ms_median']:.1f} ms, nodes/group {s['nodes_per_group']:.2f}, "
            f"{s['replans']} replans of {window} steps"
        )
        if args.output:
            write_json(args.output, {"algorithm": args.algorithm, "window": window,
                                      "config": config.to_dict(), **result.to_dict()})
        return 0
    if not args.output:
        raise ValueError("-o/--output: expected a path for plan.json")
    if args.trace is not None:
        counts = load_trace(args.trace).counts
        window = args.window or counts.shape[0]
        load = predict_load(counts, method=args.predictor, window=window, halflife=args.halflife)
    else:
        load = read_load(args.load)
    previous = Plan.load(args.previous) if args.previous else None
    start = time.perf_counter()
    result = plan(load, config, previous, algorithm=args.algorithm, replan=replan)
    elapsed = time.perf_counter() - start
    result.save(args.output)
    moves = "n/a (no --previous)" if result.moves is None else str(result.moves)
    console.print(
        f"{args.algorithm}: balancedness {result.balancedness:.4f}, moves {moves}, "
        f"nodes/group {result.nodes_per_group:.2f}, {result.num_layers} layers x "
        f"{result.num_experts} experts -> {config.num_replicas} slots on {config.num_gpus} GPUs "
        f"in {elapsed * 1e3:.1f} ms; wrote {args.output}"
    )
    return 0
