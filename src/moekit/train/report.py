"""Readable terminal summaries (rich tables) of a training run and of a comparison."""

from __future__ import annotations

__all__ = ["run_summary_table", "compare_summary_table"]


def run_summary_table(result: dict):
    """A ``rich.table.Table``: held-out loss per domain, balance, specialization, speed."""
    from rich.table import Table

    final = result["final"]
    moe = result["lm"]["moe"]
    table = Table(title=f"{result['name']}: balance={moe['balance']}, {moe['num_experts']} experts "
                        f"top-{moe['top_k']}, {len(result['history'])} steps on {result['device']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for domain, loss in final["val_loss"].items():
        table.add_row(f"val loss {domain} (nats/byte)", f"{loss:.4f}")
    table.add_row("val loss mean (bits/byte)", f"{final['val_bpb_mean']:.4f}")
    table.add_row("MaxVio, held-out set as one window", f"{final['max_vio_global']:.3f}")
    table.add_row("MaxVio, one domain at a time", f"{final['max_vio_domain']:.3f}")
    table.add_row("top-1 expert share per domain", f"{final['top1_share']:.3f}")
    table.add_row(f"top-{moe['top_k']} expert share per domain", f"{final['topk_share']:.3f}")
    table.add_row("NMI(domain; expert)", f"{final['nmi']:.3f}")
    table.add_row("step time (median, ms)", f"{1e3 * result['step_time_s_median']:.1f}")
    table.add_row("tokens/s (training)", f"{result['tokens_per_s']:,.0f}")
    return table


def compare_summary_table(doc: dict):
    """A ``rich.table.Table`` with one row per (arm, seed)."""
    from rich.table import Table

    from moekit.train.compare import TABLE_COLUMNS as cols

    table = Table(title=f"balance comparison on {doc['device']}")
    for _, label, _ in cols:
        table.add_column(label, justify="right")
    for row in doc["rows"]:
        table.add_row(*(fmt.format(row[key]) for key, _, fmt in cols))
    return table
