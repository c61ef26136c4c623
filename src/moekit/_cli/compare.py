"""``moekit compare``: train one run per balance objective and tabulate the differences."""

from __future__ import annotations

__all__ = ["add_parser", "run"]


def _csv(text: str, kind=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None


def add_parser(subparsers) -> None:
    from moekit._cli.train import add_common_arguments

    p = subparsers.add_parser(
        "compare", help="compare balance objectives on the same model, seed and data",
        description="Train the small MoE LM once per balance objective (same initial weights, "
        "same data order per seed) and write compare.md, compare.json and compare.png: "
        "held-out loss per domain, global MaxVio, top-1/top-k expert share, NMI, step time. "
        "--preset cpu-compare (default) takes ~2-3 min per arm on 2 idle CPU cores; --preset gpu ~4.5 "
        "min per arm on one H100.")
    add_common_arguments(p, "cpu-compare")
    p.add_argument("--balance", default="none,micro,seq,global,aux_free",
                   help="comma-separated arms (default none,micro,seq,global,aux_free)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--multi-seed-arms", default=None,
                   help="only these arms run every seed, the others the first only "
                        "(e.g. micro,global); default: all arms run all seeds")
    p.add_argument("--name", default=None, help="output folder under --out-dir (default compare-<preset>)")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from rich.console import Console

    from moekit._cli.train import resolve_preset
    from moekit.train import compare, load_corpus
    from moekit.train.report import compare_summary_table

    arms = _csv(args.balance)
    seeds = _csv(args.seeds, int)
    seeds_for = None
    if args.multi_seed_arms:
        multi = set(_csv(args.multi_seed_arms))
        unknown = multi - set(arms)
        if unknown:
            raise ValueError(f"--multi-seed-arms: expected arms from --balance {arms}, got {sorted(unknown)}")
        seeds_for = {a: (len(seeds) if a in multi else 1) for a in arms}
    base = resolve_preset(args)
    out = Path(args.out_dir) / (args.name or f"compare-{args.preset}")
    doc = compare(base, arms, seeds, load_corpus(), out, progress=not args.no_progress,
                  seeds_for=seeds_for)
    console = Console()
    console.print(compare_summary_table(doc))
    console.print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")
    return 0
