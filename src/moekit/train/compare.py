"""Compare balance objectives: the same model, seed and data order per arm.

``compare`` trains one run per (seed, arm), evaluates each on the held-out set, and writes a
markdown table, a JSON file with every figure, and a side-by-side PNG.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from moekit._io import atomic_write_text
from moekit.train.corpus import Corpus
from moekit.train.plots import plot_compare, plot_run
from moekit.train.presets import BALANCE_ARMS, Preset, with_balance
from moekit.train.trainer import train

__all__ = ["compare", "summary_row", "markdown_table", "TABLE_COLUMNS"]

TABLE_COLUMNS = [  # (row key, header, format)
    ("balance", "arm", "{}"), ("seed", "seed", "{}"), ("val_loss_mean", "val loss", "{:.4f}"),
    ("max_vio_global", "MaxVio (global)", "{:.3f}"), ("max_vio_batch", "MaxVio (train batch)", "{:.3f}"),
    ("top1_share", "top1 share", "{:.3f}"), ("topk_share", "topk share", "{:.3f}"),
    ("nmi", "NMI", "{:.3f}"), ("step_time_ms", "step ms", "{:.1f}")]


def summary_row(result: dict, seed: int) -> dict:
    """One table row of a finished run (figures from its final held-out evaluation).

    ``max_vio_batch`` is the mean MaxVio of the global training batch over the last quarter
    of the steps (the balance the objective actually enforces while training).
    """
    final = result["final"]
    hist = result["history"]
    tail = hist[len(hist) * 3 // 4:] or hist
    return {
        "run": result["name"], "balance": result["lm"]["moe"]["balance"], "seed": seed,
        "val_loss_mean": final["val_loss_mean"], "val_loss": final["val_loss"],
        "max_vio_global": final["max_vio_global"], "max_vio_domain": final["max_vio_domain"],
        "max_vio_batch": float(np.mean([h["max_vio_batch"] for h in tail])),
        "top1_share": final["top1_share"], "topk_share": final["topk_share"], "nmi": final["nmi"],
        "step_time_ms": 1e3 * result["step_time_s_median"], "tokens_per_s": result["tokens_per_s"],
    }


def markdown_table(rows: list[dict], domains: list[str]) -> str:
    """Rows per run, then a mean row per arm when an arm has several seeds."""
    head = [c[1] for c in TABLE_COLUMNS] + [f"val {d}" for d in domains]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(row: dict) -> str:
        cells = [fmt_.format(row[key]) for key, _, fmt_ in TABLE_COLUMNS]
        cells += [f"{row['val_loss'][d]:.4f}" for d in domains]
        return "| " + " | ".join(cells) + " |"

    for row in rows:
        lines.append(fmt(row))
    for arm in dict.fromkeys(r["balance"] for r in rows):
        group = [r for r in rows if r["balance"] == arm]
        if len(group) > 1:
            mean = {k: float(np.mean([r[k] for r in group])) for k, _, _ in TABLE_COLUMNS[2:]}
            mean.update(balance=f"**{arm} (mean)**", seed=f"{len(group)} seeds",
                        val_loss={d: float(np.mean([r["val_loss"][d] for r in group])) for d in domains})
            lines.append(fmt(mean))
    return "\n".join(lines) + "\n"


def compare(base: Preset, arms: list[str], seeds: list[int], corpus: Corpus, out_dir: str | Path,
            progress: bool = True, seeds_for: dict[str, int] | None = None) -> dict:
    """Train every arm for every seed (seeds_for caps the number of seeds of an arm).

    Writes ``out_dir/<arm>-s<seed>/`` (metrics.json, plots), ``compare.md``, ``compare.json``
    and ``compare.png``; returns the JSON document.
    """
    unknown = [a for a in arms if a not in BALANCE_ARMS]
    if unknown or not arms:
        raise ValueError(f"balance: expected a comma list from {list(BALANCE_ARMS)}, got {arms}")
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, results = [], {}
    for i, seed in enumerate(seeds):
        for arm in arms:
            if seeds_for and i >= seeds_for.get(arm, len(seeds)):
                continue
            name = f"{arm}-s{seed}"
            lm = with_balance(base.lm, arm)
            # The seed drives both the initial weights and the data order.
            loader = dataclasses.replace(base.loader, seed=seed)
            cfg = dataclasses.replace(base.train, seed=seed)
            result = train(lm, loader, cfg, corpus, run_dir=out_dir / name, progress=progress,
                           name=name, checkpoint=False)
            plot_run(result, out_dir / name)
            results[name] = result
            rows.append(summary_row(result, seed))
    runs = {name: {"history": [{k: h[k] for k in ("step", "loss", "aux", "max_vio_batch",
                                                   "step_time_s")} for h in res["history"]],
                   "evals": [{k: v for k, v in e.items() if k != "counts_LDE"} for e in res["evals"]],
                   "counts_LDE": res["counts_LDE"]}
            for name, res in results.items()}
    doc = {"arms": arms, "seeds": seeds, "domains": list(corpus.domains), "rows": rows,
           "device": next(iter(results.values()))["device_name"], "runs": runs,
           "preset": {"lm": results[rows[0]["run"]]["lm"], "loader": dataclasses.asdict(base.loader),
                      "train": dataclasses.asdict(base.train)}}
    table = markdown_table(rows, list(corpus.domains))
    atomic_write_text(out_dir / "compare.md", table)
    atomic_write_text(out_dir / "compare.json", json.dumps(doc, indent=1) + "\n")
    plot_compare(rows, results, out_dir / "compare.png")
    doc["table"] = table
    return doc
