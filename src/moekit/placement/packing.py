"""Packing items into equal-size packs, vectorised over independent rows.

A *row* is one independent packing problem (a layer, or a (layer, node) pair); ``B`` rows are
solved together so that the Python loops run over items or search steps, never over rows.
Shapes: ``B`` rows, ``N`` items per row, ``P`` packs per row, ``S = N / P`` items per pack,
``K`` distinct keys (logical experts). Items of equal key must not share a pack when keys are
given (two replicas of one expert on one GPU would be useless: they share the same memory and
the same compute).
"""

from __future__ import annotations

import numpy as np

__all__ = ["lpt_pack", "arrange", "swap_search"]


def lpt_pack(weight_BN: np.ndarray, num_packs: int, keys_BN: np.ndarray | None = None,
             num_keys: int = 0, home_BN: np.ndarray | None = None,
             limit_B: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy balanced packing (longest processing time first, with a capacity).

    Items are visited heaviest first (stable on ties) and each goes to the lightest pack that
    is not full (``N / P`` items) -- and, when ``keys_BN`` is given, that holds no item of the
    same key, if such a pack exists. With ``home_BN`` (a preferred pack per item, -1 for none)
    and ``limit_B``, an item goes to its home pack instead whenever that pack can take it and
    stays within ``limit_B`` of load (anchored packing: few items move). Returns ``pack_BN`` (pack of each item) and ``rank_BN``
    (its position inside the pack, in order of arrival), both int64.
    """
    num_rows, num_items = weight_BN.shape
    cap = num_items // num_packs
    order_BN = np.argsort(-weight_BN, axis=1, kind="stable")
    rows = np.arange(num_rows)
    load_BP = np.zeros((num_rows, num_packs))
    count_BP = np.zeros((num_rows, num_packs), dtype=np.int64)
    pack_BN = np.empty((num_rows, num_items), dtype=np.int64)
    rank_BN = np.empty((num_rows, num_items), dtype=np.int64)
    has_BPK = np.zeros((num_rows, num_packs, num_keys), dtype=bool) if keys_BN is not None else None
    for i in range(num_items):
        item_B = order_BN[:, i]
        cand_BP = np.where(count_BP < cap, load_BP, np.inf)
        if has_BPK is not None:
            key_B = keys_BN[rows, item_B]
            free_BP = np.where(has_BPK[rows, :, key_B], np.inf, cand_BP)
            ok_B = np.isfinite(free_BP).any(axis=1)
            cand_BP = np.where(ok_B[:, None], free_BP, cand_BP)
        pack_B = cand_BP.argmin(axis=1)
        if home_BN is not None:
            home_B = home_BN[rows, item_B]
            hs_B = np.maximum(home_B, 0)
            stay_B = ((home_B >= 0) & np.isfinite(cand_BP[rows, hs_B])
                      & (load_BP[rows, hs_B] + weight_BN[rows, item_B] <= limit_B))
            pack_B = np.where(stay_B, hs_B, pack_B)
        pack_BN[rows, item_B] = pack_B
        rank_BN[rows, item_B] = count_BP[rows, pack_B]
        load_BP[rows, pack_B] += weight_BN[rows, item_B]
        count_BP[rows, pack_B] += 1
        if has_BPK is not None:
            has_BPK[rows, pack_B, key_B] = True
    return pack_BN, rank_BN


def arrange(pack_BN: np.ndarray, rank_BN: np.ndarray, num_packs: int) -> np.ndarray:
    """Slot layout of a packing: ``item_BPS[b, p, s]`` is the item in slot ``s`` of pack ``p``."""
    num_rows, num_items = pack_BN.shape
    cap = num_items // num_packs
    item_BPS = np.empty((num_rows, num_packs * cap), dtype=np.int64)
    item_BPS[np.arange(num_rows)[:, None], pack_BN * cap + rank_BN] = np.arange(num_items)[None]
    return item_BPS.reshape(num_rows, num_packs, cap)


def swap_search(item_BPS: np.ndarray, weight_BN: np.ndarray, keys_BN: np.ndarray | None = None,
                num_keys: int = 0, *, home_BPK: np.ndarray | None = None, move_price: float = 0.0,
                max_moves_B: np.ndarray | None = None, floor_B: np.ndarray | None = None,
                max_iters: int | None = None, search_width: int = 4,
                stop_tolerance: float = 1e-4, var_BN: np.ndarray | None = None,
                risk: float = 0.0) -> np.ndarray:
    """Pairwise-swap local search that lowers the heaviest pack of every row.

    Each step, in every row still improving, tries every exchange of an item of the heaviest
    pack ``g`` with an item of one of the ``search_width`` lightest packs ``q`` and applies the best one if it lowers
    ``max(load_g', load_q')`` below ``load_g`` (so the sorted pack loads fall lexicographically
    and the search ends). With ``keys_BN``, a swap may not put two items of one key in a pack.

    Movement-aware mode: ``home_BPK[b, p, k]`` says pack ``p`` already holds key ``k`` (the
    previous plan). A swap's score is ``gain / mean_load - move_price * d_moves`` where
    ``d_moves`` is the change in the number of (pack, key) pairs not at home, and rows stop
    taking swaps that would push their moves above ``max_moves_B``. Load below ``floor_B`` is
    worth nothing (a node that is not the layer's bottleneck need not move anything). A row
    stops once its heaviest pack is within ``stop_tolerance`` of its mean (nothing left to win).

    Risk-aware mode (``risk > 0`` and ``var_BN``, the variance of every item's load): a pack's
    score is ``load + risk * sqrt(sum of its items' variances)`` (a high quantile of its load
    when the items' errors are independent), and the search lowers the highest *score* instead
    of the highest load: it spreads volatile items over packs and leaves headroom where they
    sit. ``risk = 0`` is the plain load.

    Returns the improved ``item_BPS`` (a new array; the input is left untouched).
    """
    item_BPS = item_BPS.copy()
    num_rows, num_packs, cap = item_BPS.shape
    if num_packs < 2:
        return item_BPS
    rows_all = np.arange(num_rows)
    w_BPS = weight_BN[rows_all[:, None, None], item_BPS]
    k_BPS = keys_BN[rows_all[:, None, None], item_BPS] if keys_BN is not None else None
    load_BP = w_BPS.sum(axis=2)
    mean_B = np.maximum(load_BP.mean(axis=1), 1e-300)
    risky = risk > 0 and var_BN is not None
    if risky:
        v_BPS = var_BN[rows_all[:, None, None], item_BPS].astype(np.float64)
        var_BP = v_BPS.sum(axis=2)
    has_BPK = None
    if k_BPS is not None:
        has_BPK = np.zeros((num_rows, num_packs, num_keys), dtype=bool)
        has_BPK[rows_all[:, None, None], np.arange(num_packs)[None, :, None], k_BPS] = True
    away_B = None
    if home_BPK is not None:
        away_B = (~home_BPK[rows_all[:, None, None], np.arange(num_packs)[None, :, None], k_BPS]).sum(axis=(1, 2))
    active = rows_all
    pack_ids = np.arange(num_packs)
    # only the lightest packs are swap partners: the best swap for the heaviest pack is almost
    # always with one of them, and it keeps a step O(A * Q * S^2) instead of O(A * P * S^2)
    num_q = min(num_packs, max(search_width, 2))
    max_iters = max_iters if max_iters is not None else 4 * num_packs * cap
    for _ in range(max_iters):
        if active.size == 0:
            break
        a = active
        n_a = a.size
        ra = np.arange(n_a)
        load_AP = load_BP[a]
        # score_AP: what the search minimises the maximum of (the load, or its risk quantile)
        score_AP = load_AP + risk * np.sqrt(var_BP[a]) if risky else load_AP
        g_A = score_AP.argmax(axis=1)
        load_g_A = load_AP[ra, g_A]
        score_g_A = score_AP[ra, g_A]
        keep = score_g_A > mean_B[a] * (1 + stop_tolerance)
        if not keep.all():
            a, load_AP, score_AP, g_A = a[keep], load_AP[keep], score_AP[keep], g_A[keep]
            load_g_A, score_g_A = load_g_A[keep], score_g_A[keep]
            n_a = a.size
            if n_a == 0:
                break
            ra = np.arange(n_a)
        q_AQ = np.argpartition(score_AP, num_q - 1, axis=1)[:, :num_q] if num_q < num_packs else \
            np.broadcast_to(pack_ids, (n_a, num_packs))
        ai = ra[:, None]
        # candidates are ranked in float32 (half the memory traffic); the acceptance test and
        # the bookkeeping below stay in float64
        wg_AS = w_BPS[a, g_A].astype(np.float32)                   # items of the heaviest pack
        w_AQS = w_BPS[a[:, None], q_AQ].astype(np.float32)
        d = wg_AS[:, None, :, None] - w_AQS[:, :, None, :]         # [A, q, slot on g, slot on q]
        if risky:
            dv = (v_BPS[a, g_A].astype(np.float32)[:, None, :, None]
                  - v_BPS[a[:, None], q_AQ].astype(np.float32)[:, :, None, :])
            vg = var_BP[a, g_A].astype(np.float32)[:, None, None, None]
            vq = var_BP[a[:, None], q_AQ].astype(np.float32)[:, :, None, None]
            new_hi = np.maximum(load_g_A.astype(np.float32)[:, None, None, None] - d
                                + risk * np.sqrt(np.maximum(vg - dv, 0)),
                                load_AP[ai, q_AQ].astype(np.float32)[:, :, None, None] + d
                                + risk * np.sqrt(np.maximum(vq + dv, 0)))
            invalid = new_hi >= score_g_A.astype(np.float32)[:, None, None, None]
        else:
            new_hi = np.maximum(load_g_A.astype(np.float32)[:, None, None, None] - d,
                                load_AP[ai, q_AQ].astype(np.float32)[:, :, None, None] + d)
            invalid = d <= 0
        invalid |= (q_AQ == g_A[:, None])[:, :, None, None]
        if has_BPK is not None:
            kg_AS = k_BPS[a, g_A]
            kq_AQS = k_BPS[a[:, None], q_AQ]
            # the item from g may not meet its key on q, nor the item from q its key on g
            q_has_kg = has_BPK[a[:, None, None], q_AQ[:, :, None], kg_AS[:, None, :]]
            g_has_kq = has_BPK[a[:, None, None], g_A[:, None, None], kq_AQS]
            invalid |= q_has_kg[:, :, :, None] | g_has_kq[:, :, None, :]
        if home_BPK is None:
            new_hi[invalid] = np.inf
            best = new_hi.reshape(n_a, -1).argmin(axis=1)
            ok = np.isfinite(new_hi.reshape(n_a, -1)[ra, best])
        else:
            if floor_B is not None:
                new_hi = np.maximum(new_hi, floor_B[a].astype(np.float32)[:, None, None, None])
            gain = score_g_A.astype(np.float32)[:, None, None, None] - new_hi
            b3, q3, g3 = a[:, None, None], q_AQ[:, :, None], g_A[:, None, None]
            # d_moves = new (pack, key) pairs away from home minus the ones given up
            d_moves = ((~home_BPK[b3, q3, kg_AS[:, None, :]])[:, :, :, None].astype(np.int64)
                       + (~home_BPK[b3, g3, kq_AQS])[:, :, None, :]
                       - (~home_BPK[a[:, None], g_A[:, None], kg_AS])[:, None, :, None]
                       - (~home_BPK[b3, q3, kq_AQS])[:, :, None, :])
            inv_mean = (1.0 / np.maximum(mean_B[a], 1e-30)).astype(np.float32)
            score = gain * inv_mean[:, None, None, None] - move_price * d_moves
            if max_moves_B is not None:
                invalid |= (away_B[a][:, None, None, None] + d_moves) > max_moves_B[a][:, None, None, None]
            invalid |= gain <= 1e-9 * score_g_A.astype(np.float32)[:, None, None, None]
            score[invalid] = -np.inf
            flat = score.reshape(n_a, -1)
            best = flat.argmax(axis=1)
            ok = flat[ra, best] > 0
        if not ok.any():
            break
        qi_A, sg_A, sq_A = np.unravel_index(best, (num_q, cap, cap))
        # re-check the chosen swap in float64: a float32 rounding must not let a row cycle, and
        # a swap must win at least 1e-5 of the mean load to be worth an iteration
        q_sel = q_AQ[ra, qi_A]
        d64 = w_BPS[a, g_A, sg_A] - w_BPS[a, q_sel, sq_A]
        if risky:
            dv64 = v_BPS[a, g_A, sg_A] - v_BPS[a, q_sel, sq_A]
            hi64 = np.maximum(load_g_A - d64 + risk * np.sqrt(np.maximum(var_BP[a, g_A] - dv64, 0)),
                              load_AP[ra, q_sel] + d64
                              + risk * np.sqrt(np.maximum(var_BP[a, q_sel] + dv64, 0)))
        else:
            hi64 = np.maximum(load_g_A - d64, load_AP[ra, q_sel] + d64)
            ok &= d64 > 0
        if floor_B is not None and home_BPK is not None:
            hi64 = np.maximum(hi64, floor_B[a])
        ok &= score_g_A - hi64 > 1e-5 * mean_B[a]
        if not ok.any():
            break
        b, sg, sq, g = a[ok], sg_A[ok], sq_A[ok], g_A[ok]
        q = q_AQ[ra[ok], qi_A[ok]]
        if away_B is not None:
            away_B[b] += d_moves[ok.nonzero()[0], qi_A[ok], sg, sq]
        if has_BPK is not None:
            kg, kq = k_BPS[b, g, sg], k_BPS[b, q, sq]
            has_BPK[b, g, kg] = False
            has_BPK[b, q, kq] = False
            has_BPK[b, g, kq] = True
            has_BPK[b, q, kg] = True
            k_BPS[b, g, sg], k_BPS[b, q, sq] = kq, kg
        wg, wq = w_BPS[b, g, sg], w_BPS[b, q, sq]
        w_BPS[b, g, sg], w_BPS[b, q, sq] = wq, wg
        load_BP[b, g] += wq - wg
        load_BP[b, q] += wg - wq
        if risky:
            vg_, vq_ = v_BPS[b, g, sg], v_BPS[b, q, sq]
            v_BPS[b, g, sg], v_BPS[b, q, sq] = vq_, vg_
            var_BP[b, g] += vq_ - vg_
            var_BP[b, q] += vg_ - vq_
        ig, iq = item_BPS[b, g, sg], item_BPS[b, q, sq]
        item_BPS[b, g, sg], item_BPS[b, q, sq] = iq, ig
        active = b
    return item_BPS
