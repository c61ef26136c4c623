"""Next-window expert load from a routing trace.

A plan is judged on the window *after* the one it was made from, so the planner should be fed a
prediction, not the last window alone. Shapes: ``T`` steps, ``L`` layers, ``E`` experts.
"""

from __future__ import annotations

import numpy as np

from moekit.placement.config import check_load

__all__ = ["predict_load"]


def predict_load(counts_TLE, *, method: str = "ema", window: int = 1, halflife: float = 8.0,
                 risk: float = 0.0) -> np.ndarray:
    """Predicted load ``[L, E]`` of the next ``window`` steps, in tokens per ``window`` steps.

    counts_TLE: ``[T, L, E]`` routing counts of the steps seen so far (oldest first).
    method: ``"last"`` -- the sum of the last ``window`` steps (what EPLB is fed in vLLM/SGLang);
        ``"window"`` -- the same as ``"last"`` (kept as the name DESIGN.md uses);
        ``"ema"`` -- an exponential moving average over all steps with ``halflife`` steps,
        scaled to ``window`` steps: smooths out per-batch noise and bursts that will not repeat.
    risk: with ``"ema"``, add ``risk`` standard deviations of the next window's load (from the
        EMA of the per-step variance, ``sqrt(window * var)``): experts whose load jumps around
        get planned as heavier, so they get more replicas and emptier GPUs.
    """
    if hasattr(counts_TLE, "detach"):
        counts_TLE = counts_TLE.detach().cpu().numpy()
    c = np.asarray(counts_TLE, dtype=np.float64)
    if c.ndim != 3 or c.shape[0] < 1:
        raise ValueError(f"counts: expected shape [steps >= 1, layers, experts], got {c.shape}")
    check_load(c.reshape(-1, c.shape[-1]), "counts")
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window: expected a positive integer, got {window!r}")
    if method in ("last", "window"):
        return c[-window:].sum(axis=0)
    if method != "ema":
        raise ValueError(f"method: expected 'last', 'window' or 'ema', got {method!r}")
    if not np.isfinite(halflife) or halflife <= 0:
        raise ValueError(f"halflife: expected a positive number of steps, got {halflife}")
    if not np.isfinite(risk) or risk < 0:
        raise ValueError(f"risk: expected a finite value >= 0, got {risk}")
    age_T = np.arange(c.shape[0])[::-1].astype(np.float64)
    w_T = 0.5 ** (age_T / halflife)
    w_T /= w_T.sum()
    mean_LE = np.tensordot(w_T, c, axes=1)
    if risk == 0:
        return mean_LE * window
    var_LE = np.tensordot(w_T, (c - mean_LE) ** 2, axes=1)
    return mean_LE * window + risk * np.sqrt(window * var_LE)
