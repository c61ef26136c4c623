"""Local search over replica counts: give a slot of the heaviest GPU to another expert.

Divisor methods choose counts from the loads alone; the best counts also depend on how the
replicas pack (a tiny expert's second replica can be the filler that evens two GPUs). This
search changes counts *and* layout together, vectorised over rows.

Shapes: ``B`` rows, ``P`` packs (GPUs), ``S`` slots per pack, ``X`` experts per row.
"""

from __future__ import annotations

import numpy as np

from moekit.placement.replication import row_counts

__all__ = ["retarget_search"]


def _loads(key_BPS: np.ndarray, w_BX: np.ndarray, cnt_BX: np.ndarray) -> np.ndarray:
    rows = np.arange(key_BPS.shape[0])[:, None, None]
    return (w_BX / cnt_BX)[rows, key_BPS].sum(axis=2)


def retarget_search(key_BPS: np.ndarray, w_BX: np.ndarray, max_count,
                    max_iters: int = 64) -> np.ndarray:
    """Improve a duplicate-free layout ``key_BPS`` by re-assigning slots of the heaviest pack.

    A step takes a slot of the heaviest pack ``g`` holding expert ``x`` (with ``c_x >= 2``) and
    gives it to an expert ``y`` that ``g`` lacks (``c_y < max_count``, an int or one per row
    ``[B]``): ``g`` sheds
    ``w_x / c_x`` and gains ``w_y / (c_y + 1)``; every other pack holding ``x`` gains
    ``w_x / (c_x - 1) - w_x / c_x``; packs holding ``y`` get lighter (ignored: the step is taken
    only if the upper bound on the new maximum, computed without that relief, is below the old
    maximum, so the maximum falls strictly). Returns the new keys ``[B, P, S]``.
    """
    key_BPS = key_BPS.copy()
    num_rows, num_packs, cap = key_BPS.shape
    num_exp = w_BX.shape[1]
    if num_packs < 2:
        return key_BPS
    rows_all = np.arange(num_rows)
    cnt_BX = row_counts(key_BPS, num_exp)
    has_BPX = np.zeros((num_rows, num_packs, num_exp), dtype=bool)
    has_BPX[rows_all[:, None, None], np.arange(num_packs)[None, :, None], key_BPS] = True
    load_BP = _loads(key_BPS, w_BX, cnt_BX)
    cap_B = np.broadcast_to(np.asarray(max_count), (num_rows,))
    active = rows_all
    for _ in range(max_iters):
        if active.size == 0:
            break
        a = active
        ra = np.arange(a.size)
        load_AP = load_BP[a]
        g_A = load_AP.argmax(axis=1)
        top_A = load_AP[ra, g_A]
        w_AX, c_AX = w_BX[a], cnt_BX[a]
        x_AS = key_BPS[a, g_A]
        wx_AS = w_AX[ra[:, None], x_AS]
        cx_AS = c_AX[ra[:, None], x_AS]
        can_AS = cx_AS >= 2
        grow_AS = np.where(can_AS, wx_AS / np.maximum(cx_AS - 1, 1) - wx_AS / cx_AS, 0.0)
        holds_ASP = has_BPX[a[:, None, None], np.arange(num_packs)[None, None, :], x_AS[:, :, None]]
        others_ASP = load_AP[:, None, :] + holds_ASP * grow_AS[:, :, None]
        others_ASP[ra, :, g_A] = -np.inf
        bound_AS = np.where(can_AS, others_ASP.max(axis=2), np.inf)
        new_g_ASX = (top_A[:, None] - wx_AS / cx_AS)[:, :, None] + (w_AX / (c_AX + 1))[:, None, :]
        ok_AX = ~has_BPX[a, g_A] & (c_AX < cap_B[a][:, None])
        new_max = np.maximum(bound_AS[:, :, None], new_g_ASX)
        new_max = np.where(ok_AX[:, None, :], new_max, np.inf)
        flat = new_max.reshape(a.size, -1)
        best = flat.argmin(axis=1)
        better = flat[ra, best] < top_A * (1 - 1e-12)
        if not better.any():
            break
        s_A, y_A = np.unravel_index(best, (cap, num_exp))
        b, g, s, y = a[better], g_A[better], s_A[better], y_A[better]
        x = key_BPS[b, g, s]
        key_BPS[b, g, s] = y
        cnt_BX[b, x] -= 1
        cnt_BX[b, y] += 1
        has_BPX[b, g, x] = False
        has_BPX[b, g, y] = True
        load_BP[b] = _loads(key_BPS[b], w_BX[b], cnt_BX[b])
        active = b
    return key_BPS
