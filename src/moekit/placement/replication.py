"""How many replicas each logical expert gets, vectorised over rows.

Shapes: ``B`` rows (layers or (layer, node) pairs), ``X`` logical experts per row, ``R`` slots
per row. A replica of expert ``x`` carries ``w_x / c_x`` of its load.
"""

from __future__ import annotations

import numpy as np

__all__ = ["greedy_counts", "sticky_counts", "expand_replicas", "row_counts"]


def greedy_counts(weight_BX: np.ndarray, num_slots: int, max_count=None) -> np.ndarray:
    """Replica counts that minimise the largest per-replica load ``max_x w_x / c_x``.

    Starts from one replica each and repeatedly gives one more to the expert with the largest
    load per replica (among those below ``max_count``): for this objective the greedy is exact
    (the classic divisor-method argument; it is D'Hondt's apportionment). ``max_count``: an int
    or an int array ``[B]`` (one cap per row; ``cap * X >= num_slots``). Returns int64
    ``[B, X]`` summing to ``num_slots`` in every row.
    """
    num_rows, num_exp = weight_BX.shape
    cnt_BX = np.ones((num_rows, num_exp), dtype=np.int64)
    rows = np.arange(num_rows)
    cap_B1 = None if max_count is None else np.broadcast_to(np.asarray(max_count), (num_rows,))[:, None]
    for _ in range(num_slots - num_exp):
        per_BX = weight_BX / cnt_BX
        if cap_B1 is not None:
            per_BX = np.where(cnt_BX >= cap_B1, -np.inf, per_BX)
        cnt_BX[rows, per_BX.argmax(axis=1)] += 1
    return cnt_BX


def sticky_counts(weight_BX: np.ndarray, old_BX: np.ndarray, max_count: int,
                  hysteresis: float) -> np.ndarray:
    """Move replicas from ``old_BX`` only where it pays (movement-aware counts).

    Repeatedly takes one replica from the donor with the smallest load per replica after the
    loss (``w_d / (c_d - 1)``, ``c_d >= 2``) and gives it to the expert with the largest load per
    replica (``w_t / c_t``, ``c_t < max_count``), while ``w_t / c_t > (1 + hysteresis) *
    w_d / (c_d - 1)``. With ``hysteresis = 0`` this ends at :func:`greedy_counts`' optimum of
    ``max w / c``; larger values keep more of the old counts (each changed count is a move).
    """
    cnt_BX = np.minimum(old_BX.astype(np.int64), max_count)
    rows = np.arange(cnt_BX.shape[0])
    deficit_B = old_BX.sum(axis=1) - cnt_BX.sum(axis=1)
    # counts clipped at max_count go to the experts that need them most, like greedy_counts
    for _ in range(int(deficit_B.max(initial=0))):
        per_BX = np.where(cnt_BX >= max_count, -np.inf, weight_BX / cnt_BX)
        give = deficit_B > 0
        cnt_BX[rows[give], per_BX[give].argmax(axis=1)] += 1
        deficit_B -= give
    active = rows
    for _ in range(int(cnt_BX.sum(axis=1).max())):
        if active.size == 0:
            break
        c = cnt_BX[active]
        w = weight_BX[active]
        top_per = np.where(c >= max_count, -np.inf, w / c)
        t = top_per.argmax(axis=1)
        donor_per = np.where(c >= 2, w / np.maximum(c - 1, 1), np.inf)
        donor_per[np.arange(active.size), t] = np.inf
        d = donor_per.argmin(axis=1)
        ar = np.arange(active.size)
        ok = top_per[ar, t] > (1.0 + hysteresis) * donor_per[ar, d]
        active, t, d = active[ok], t[ok], d[ok]
        cnt_BX[active, t] += 1
        cnt_BX[active, d] -= 1
    return cnt_BX


def expand_replicas(cnt_BX: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replica list of each row: ``key_BR`` (expert of each replica, grouped by expert) and
    ``rank_BR`` (0 for an expert's first replica, 1 for the second, ...)."""
    num_rows, num_exp = cnt_BX.shape
    num_slots = int(cnt_BX[0].sum())
    key_BR = np.repeat(np.tile(np.arange(num_exp), num_rows), cnt_BX.reshape(-1)).reshape(num_rows, num_slots)
    start_BX = np.cumsum(cnt_BX, axis=1) - cnt_BX
    rank_BR = np.arange(num_slots)[None, :] - np.take_along_axis(start_BX, key_BR, axis=1)
    return key_BR, rank_BR


def row_counts(key_BN: np.ndarray, num_keys: int) -> np.ndarray:
    """How often each key ``0..num_keys-1`` occurs in every row of ``key_BN`` (int64 ``[B, K]``;
    any trailing axes of ``key_BN`` are flattened into the row)."""
    num_rows = key_BN.shape[0]
    flat = key_BN.reshape(num_rows, -1) + (np.arange(num_rows) * num_keys)[:, None]
    return np.bincount(flat.ravel(), minlength=num_rows * num_keys).reshape(num_rows, num_keys)
