"""PNG figures of a training run and of a balance comparison (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moekit._io import atomic_path

__all__ = ["plot_run", "plot_compare"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def _shares(counts_LDE) -> np.ndarray:
    c = np.asarray(counts_LDE, dtype=np.float64)
    return c / np.maximum(c.sum(axis=2, keepdims=True), 1.0)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if len(y) < window or window < 2:
        return y
    kernel = np.ones(window) / window
    return np.convolve(y, kernel, mode="valid")


def plot_run(result: dict, out_dir: str | Path) -> list[Path]:
    """``loss.png`` (train loss, held-out loss per domain, batch MaxVio) and
    ``expert_load.png`` (share of each domain's assignments per expert, one panel per layer)."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    domains = result["domains"]
    steps = np.array([h["step"] for h in result["history"]])
    loss = np.array([h["loss"] for h in result["history"]])
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8))
    win = max(1, len(loss) // 30)
    ax0.plot(steps, loss, color="0.8", lw=0.8, label="train (per step)")
    ax0.plot(steps[win - 1:], _smooth(loss, win), color="k", lw=1.5, label=f"train ({win}-step mean)")
    ev_steps = [e["step"] for e in result["evals"]]
    for d in domains:
        ax0.plot(ev_steps, [e["val_loss"][d] for e in result["evals"]], "o-", ms=4, label=f"val {d}")
    ax0.set(xlabel="optimizer step", ylabel="cross-entropy (nats/byte)", title="loss")
    ax0.legend(fontsize=7)
    mv = np.array([h["max_vio_batch"] for h in result["history"]])
    ax1.plot(steps, mv, color="0.75", lw=0.8)
    ax1.plot(steps[win - 1:], _smooth(mv, win), color="C3", lw=1.5)
    ax1.set(xlabel="optimizer step", ylabel="MaxVio of the global batch",
            title=f"expert load imbalance (balance={result['lm']['moe']['balance']})")
    _save(fig, out_dir / "loss.png")
    plt.close(fig)

    shares = _shares(result["counts_LDE"])
    num_layers = shares.shape[0]
    fig, axes = plt.subplots(1, num_layers, figsize=(2.6 * num_layers + 1, 0.5 * len(domains) + 1.6),
                             squeeze=False)
    vmax = max(0.25, float(shares.max()))
    for layer, ax in enumerate(axes[0]):
        im = ax.imshow(shares[layer], vmin=0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks(range(shares.shape[2]))
        ax.set_xticklabels(range(shares.shape[2]), fontsize=6)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_yticks(range(len(domains)))
        ax.set_yticklabels(domains if layer == 0 else [], fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="share of domain's assignments", shrink=0.9)
    fig.suptitle(f"held-out expert load per domain (balance={result['lm']['moe']['balance']})",
                 fontsize=10)
    _save(fig, out_dir / "expert_load.png")
    plt.close(fig)
    return [out_dir / "loss.png", out_dir / "expert_load.png"]


def plot_compare(rows: list[dict], results: dict[str, dict], path: str | Path) -> Path:
    """Side by side: bars of val loss, global MaxVio, top1 share and NMI per arm (mean over
    seeds, dots per seed), and each arm's last-layer expert-load heat map (first seed)."""
    plt = _pyplot()
    path = Path(path)
    arms = list(dict.fromkeys(r["balance"] for r in rows))
    figs = [("val_loss_mean", "held-out loss (nats/byte)"), ("max_vio_global", "global MaxVio"),
            ("top1_share", "top-1 expert share"), ("nmi", "NMI(domain; expert)")]
    fig = plt.figure(figsize=(3.2 * max(len(figs), len(arms)), 7.2))
    grid = fig.add_gridspec(2, max(len(figs), len(arms)))
    for i, (key, label) in enumerate(figs):
        ax = fig.add_subplot(grid[0, i])
        for j, arm in enumerate(arms):
            vals = [r[key] for r in rows if r["balance"] == arm]
            ax.bar(j, np.mean(vals), color=f"C{j}")
            ax.plot([j] * len(vals), vals, "k.", ms=5)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms, rotation=30, fontsize=8)
        ax.set_title(label, fontsize=9)
        if key == "val_loss_mean":
            lo = min(r[key] for r in rows)
            hi = max(r[key] for r in rows)
            ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3) - 0.02, hi + 0.1 * (hi - lo + 1e-3) + 0.02)
    for j, arm in enumerate(arms):
        first = next(r for r in rows if r["balance"] == arm)
        res = results[first["run"]]
        layer = len(res["counts_LDE"]) - 1  # experts are not aligned across layers: one layer
        shares = _shares(res["counts_LDE"])[layer]
        ax = fig.add_subplot(grid[1, j])
        ax.imshow(shares, vmin=0, vmax=max(0.4, float(shares.max())), cmap="viridis", aspect="auto")
        ax.set_title(f"{arm}: load per domain\n(layer {layer})", fontsize=8)
        ax.set_yticks(range(len(res["domains"])))
        ax.set_yticklabels(res["domains"] if j == 0 else [], fontsize=7)
        ax.set_xlabel("expert", fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
