"""``moekit bench routers``: every router and balance objective on one synthetic task (CPU)."""

from __future__ import annotations

import argparse
import platform

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmarks that run on this machine",
        description="Benchmarks that run on this machine. GPU benchmarks live in benchmarks/*.py.")
    which = p.add_subparsers(dest="bench", metavar="WHAT")
    which.required = True
    r = which.add_parser(
        "routers", help="train every router on a skewed synthetic task; print balance figures",
        description="Train a small MoE layer with every router / balance objective on tokens from "
        "Zipf-skewed clusters and report loss, MaxVio, CV, experts per token, FLOPs saved, step time.")
    r.add_argument("--steps", type=int, default=100, help="optimizer steps per arm (default 100)")
    r.add_argument("--tokens", type=int, default=256, help="tokens per step (default 256)")
    r.add_argument("--experts", type=int, default=8, help="number of experts E (default 8)")
    r.add_argument("--top-k", type=int, default=2, help="experts per token k (default 2)")
    r.add_argument("--dim", type=int, default=32, help="model width (default 32)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("-o", "--output", default=None, help="write the results as JSON to this file")
    r.set_defaults(run=run)


def _check(args: argparse.Namespace) -> None:
    for name in ("steps", "tokens", "experts", "top_k", "dim"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.top_k > args.experts:
        raise ValueError(f"--top-k: expected at most --experts={args.experts}, got {args.top_k}")
    if args.experts % 4:
        raise ValueError(f"--experts: expected a multiple of 4 (group-limited and MoGE arms), got {args.experts}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    import torch
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    from moekit._io import atomic_write_json
    from moekit.routing.survey import DEFAULT_ARMS, SurveyConfig, survey_router

    cfg = SurveyConfig(dim=args.dim, ffn_dim=args.dim, num_experts=args.experts, top_k=args.top_k,
                       tokens=args.tokens, steps=args.steps, seed=args.seed)
    console = Console(width=max(Console().width, 132))
    rows = []
    for name, router, balance, extra in track(DEFAULT_ARMS, description="routers", console=console):
        if router == "moge" and args.top_k % extra.get("num_groups", 1):
            continue
        rows.append({"arm": name, **survey_router(cfg, router, balance, extra)})
    table = Table(title=f"Routers on Zipf-skewed clusters (E={cfg.num_experts}, k={cfg.top_k}, {cfg.steps} "
                        f"steps x {cfg.micro_batches} single-cluster micro-batches, {cfg.tokens} tokens/step)")
    for col in ("arm", "train loss", "MaxVio", "CV", "top-1 share", "NMI", "experts/token", "FLOPs saved", "ms/step"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for r in rows:
        table.add_row(r["arm"], f"{r['train_loss']:.4f}", f"{r['max_vio']:.3f}", f"{r['cv']:.3f}",
                      f"{r['top1_share']:.3f}", f"{r['nmi']:.3f}", f"{r['experts_per_token']:.2f}",
                      f"{100 * r['flops_saved']:.0f}%", f"{r['step_ms']:.1f}")
    console.print(table)
    if args.output:
        atomic_write_json(args.output, {"config": cfg.__dict__, "results": rows,
                                        "torch": torch.__version__, "machine": platform.platform()})
        console.print(f"wrote {args.output}")
    return 0
