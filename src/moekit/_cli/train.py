"""``moekit train``: train the small MoE language model on the embedded multi-domain corpus."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run", "add_common_arguments"]

_BALANCES = ("none", "micro", "seq", "global", "aux_free")


def add_common_arguments(p: argparse.ArgumentParser, default_preset: str) -> None:
    """Options shared by ``train`` and ``compare`` (model size, data, schedule)."""
    p.add_argument("--preset", default=default_preset,
                   help=f"model/data/schedule size: cpu, cpu-compare, gpu, tiny (default {default_preset})")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--mode", choices=("single", "mixed"), default=None,
                   help="micro-batches from ONE domain each (single, default) or mixed domains")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step and rank")
    p.add_argument("--micro-batch-size", type=int, default=None, help="sequences per micro-batch")
    p.add_argument("--balance-coeff", type=float, default=None, help="load-balancing loss coefficient")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--out-dir", default="runs", help="parent directory of run directories (default runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a small MoE LM on the embedded 4-domain corpus",
        description="Train a small decoder-only MoE language model (byte-level; code, KJV Bible, "
        "Python docs, arithmetic) and report held-out loss per domain, expert load balance "
        "(MaxVio) and domain specialization. With no flags: ~3 minutes on an idle 2-core CPU. Writes "
        "runs/<name>/metrics.json, loss.png, expert_load.png and a resumable checkpoint. "
        "Runs data parallel under torchrun (gloo on CPU, NCCL on GPU).")
    add_common_arguments(p, "cpu")
    p.add_argument("--balance", choices=_BALANCES, default="global",
                   help="load-balancing objective (default global)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    p.add_argument("--name", default=None, help="run name (default: <balance>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from runs/<name>/checkpoint.*")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    p.add_argument("--no-checkpoint", action="store_true", help="write no checkpoint (figures only)")
    p.set_defaults(run=run)


def resolve_preset(args):
    """The preset named by ``--preset`` with the command-line overrides applied."""
    import dataclasses

    from moekit.train import preset

    base = preset(args.preset)
    loader_kw = {k: v for k, v in (("mode", args.mode), ("micro_batch_size", args.micro_batch_size))
                 if v is not None}
    train_kw = {k: v for k, v in (("steps", args.steps), ("grad_accum", args.grad_accum),
                                  ("device", args.device),
                                  ("checkpoint_every", getattr(args, "checkpoint_every", None)))
                if v is not None}
    if "steps" in train_kw:
        base_train = base.train
        train_kw["warmup_steps"] = min(base_train.warmup_steps, max(1, train_kw["steps"] // 10))
        train_kw["eval_every"] = min(base_train.eval_every, train_kw["steps"])
    lm = base.lm
    if args.balance_coeff is not None:
        lm = dataclasses.replace(lm, moe=dataclasses.replace(lm.moe, balance_coeff=args.balance_coeff))
    return dataclasses.replace(base, lm=lm, loader=dataclasses.replace(base.loader, **loader_kw),
                               train=dataclasses.replace(base.train, **train_kw))


def run(args) -> int:
    import dataclasses
    from pathlib import Path

    from rich.console import Console

    from moekit.train import load_corpus, plot_run, train, with_balance
    from moekit.train.distributed import init_from_env, shutdown
    from moekit.train.report import run_summary_table

    base = resolve_preset(args)
    rank, _ = init_from_env(base.train.device)
    try:
        name = args.name or f"{args.balance}-s{args.seed}"
        run_dir = Path(args.out_dir) / name
        lm = with_balance(base.lm, args.balance)
        result = train(lm, dataclasses.replace(base.loader, seed=args.seed),
                       dataclasses.replace(base.train, seed=args.seed), load_corpus(),
                       run_dir=run_dir, resume=args.resume, progress=not args.no_progress, name=name,
                       checkpoint=not args.no_checkpoint)
        if rank == 0:
            plots = plot_run(result, run_dir)
            console = Console()
            console.print(run_summary_table(result))
            console.print(f"wrote {run_dir / 'metrics.json'}, " + ", ".join(str(p) for p in plots))
    finally:
        shutdown()
    return 0
