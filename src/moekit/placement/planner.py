"""moekit's placement planner and the EPLB-compatible entry point.

:func:`plan` places ``R`` physical expert slots per layer on ``P`` GPUs for a (predicted) load
``[L, E]``:

1. replica counts minimise the largest per-replica load (exact greedy, capped at one replica
   per GPU of the node); lower caps on the hottest expert are tried where they can pack better;
2. replicas are packed heaviest first into the lightest GPU without that expert (round robin,
   always valid, where that gets stuck), then a pairwise-swap local search lowers the heaviest
   GPU and a count search hands one of its slots to another expert when that lowers it; no GPU
   ever holds two replicas of one expert;
3. given the previous plan, the previous counts and counts moved where they pay (hysteresis)
   are both packed with every replica anchored to its GPU, swaps pay a price per copied expert
   (and/or a budget), and each row keeps the cheaper candidate;
4. groups stay on nodes when the configuration asks for it (EPLB's hierarchical policy); the
   groups are packed onto nodes by LPT plus swaps, and when replanning a group changes node
   only if that pays for copying its replicas.

Shapes: ``L`` layers, ``E`` experts, ``R`` slots, ``G`` groups, ``N`` nodes, ``P`` GPUs; rows
``B`` are layers (global policy) or (layer, node) pairs (hierarchical policy).
"""

from __future__ import annotations

import numpy as np
import torch

from moekit.placement.config import PlacementConfig, ReplanConfig, check_load
from moekit.placement.eplb import eplb_placement
from moekit.placement.packing import arrange, lpt_pack, swap_search
from moekit.placement.result import Plan, build_log2phy, check_phy2log
from moekit.placement.retarget import retarget_search
from moekit.placement.replication import expand_replicas, greedy_counts, row_counts, sticky_counts

__all__ = ["plan", "rebalance_experts", "moekit_placement"]


def _round_robin(cnt_BX: np.ndarray, weight_BX: np.ndarray, num_packs: int) -> np.ndarray:
    """A layout that is always valid: replicas grouped by expert (heaviest first), slot ``i`` of
    the list to pack ``i % P``; an expert has at most ``P`` consecutive replicas, so never two
    in one pack. Returns keys ``[B, P, S]``."""
    num_rows = cnt_BX.shape[0]
    order = np.argsort(-(weight_BX / cnt_BX), axis=1, kind="stable")
    cnt_sorted = np.take_along_axis(cnt_BX, order, axis=1)
    key_sorted, _ = expand_replicas(cnt_sorted)
    key_BR = np.take_along_axis(order, key_sorted, axis=1)
    cap = key_BR.shape[1] // num_packs
    return key_BR.reshape(num_rows, cap, num_packs).transpose(0, 2, 1)


def _has_duplicates(key_BPS: np.ndarray) -> np.ndarray:
    s = np.sort(key_BPS, axis=2)
    return (s[:, :, 1:] == s[:, :, :-1]).any(axis=(1, 2))


def _fresh_layout(w_BX: np.ndarray, cnt_BX: np.ndarray, num_packs: int) -> np.ndarray:
    """Keys ``[B, P, S]`` of an LPT packing that avoids duplicates (round robin where it can't)."""
    key_BR, _ = expand_replicas(cnt_BX)
    rw_BR = np.take_along_axis(w_BX / cnt_BX, key_BR, axis=1)
    pack, rank = lpt_pack(rw_BR, num_packs, key_BR, w_BX.shape[1])
    item_BPS = arrange(pack, rank, num_packs)
    key_BPS = np.take_along_axis(key_BR[:, None, :], item_BPS, axis=2)
    bad = _has_duplicates(key_BPS)
    if bad.any():
        key_BPS[bad] = _round_robin(cnt_BX[bad], w_BX[bad], num_packs)
    return key_BPS


def _anchored_layout(w_BX: np.ndarray, cnt_BX: np.ndarray, prev_BPS: np.ndarray,
                     slack: float) -> np.ndarray:
    """Keys ``[B, P, S]`` of an LPT packing where each replica stays on a GPU that held its
    expert before while that GPU stays within ``(1 + slack)`` of the mean load.

    ``prev_BPS`` holds row-local expert ids of the previous layout, ``-1`` for experts that no
    longer belong to the row. Replica ``j`` of expert ``x`` is anchored to the ``j``-th pack
    (in pack order) that held ``x``.
    """
    num_rows, num_packs, cap = prev_BPS.shape
    num_exp = w_BX.shape[1]
    key_BR, rank_BR = expand_replicas(cnt_BX)
    rw_BR = np.take_along_axis(w_BX / cnt_BX, key_BR, axis=1)
    # the j-th previous occurrence of every expert: sort previous slots by (expert, pack)
    prev_BR = np.where(prev_BPS >= 0, prev_BPS, num_exp).reshape(num_rows, -1)
    order = np.argsort(prev_BR, axis=1, kind="stable")
    old_cnt = row_counts(prev_BR, num_exp + 1)
    start = np.cumsum(old_cnt, axis=1) - old_cnt
    pos = np.take_along_axis(start, key_BR, axis=1) + rank_BR
    has_home = rank_BR < np.take_along_axis(old_cnt, key_BR, axis=1)
    home_slot = np.take_along_axis(order, np.minimum(pos, order.shape[1] - 1), axis=1)
    home_BR = np.where(has_home, home_slot // cap, -1)
    # slack = inf (a hard move budget): every replica that fits stays, also in all-zero rows
    limit_B = np.full(num_rows, np.inf) if np.isinf(slack) else rw_BR.sum(axis=1) / num_packs * (1.0 + slack)
    pack, rank = lpt_pack(rw_BR, num_packs, key_BR, num_exp, home_BR, limit_B)
    key_BPS = np.take_along_axis(key_BR[:, None, :], arrange(pack, rank, num_packs), axis=2)
    bad = _has_duplicates(key_BPS)
    if bad.any():
        key_BPS[bad] = _round_robin(cnt_BX[bad], w_BX[bad], num_packs)
    return key_BPS


def _place_rows(w_BX: np.ndarray, num_slots: int, num_packs: int, prev_BPS: np.ndarray | None,
                replan: ReplanConfig, floor_B: np.ndarray | None = None) -> np.ndarray:
    """Slot keys ``[B, num_slots]`` (pack-major) for rows of loads ``w_BX``."""
    num_rows, num_exp = w_BX.shape
    if prev_BPS is None:
        keys = _fresh_rows(w_BX, num_slots, num_packs, np.full(num_rows, num_packs))
        best_B = _max_load(w_BX, keys, num_packs)
        # Fewer replicas of the hottest expert can pack better (a small expert's second replica
        # fills a gap). Try lower caps on the count, but only in rows where the cap's lower
        # bound max(mean, max w/c) is at least 0.1% below what we have: at scale (many small
        # replicas, plans within 0.1% of the mean) that is rarely any row.
        top_B = _counts(keys, num_exp).max(axis=1)
        mean_B = w_BX.sum(axis=1) / num_packs
        for drop in (1,):
            cap_B = top_B - drop
            ok = (cap_B >= 1) & (cap_B * num_exp >= num_slots)
            if floor_B is not None:
                # a node whose heaviest GPU is under the layer's floor is not the bottleneck
                ok &= best_B > floor_B * (1 + 1e-3)
            if not ok.any():
                continue
            rows = np.flatnonzero(ok)
            cnt = greedy_counts(w_BX[rows], num_slots, cap_B[rows])
            bound = np.maximum(mean_B[rows], (w_BX[rows] / cnt).max(axis=1))
            rows = rows[bound * (1 + 1e-3) < best_B[rows]]
            if rows.size == 0:
                continue
            cand = _fresh_rows(w_BX[rows], num_slots, num_packs, cap_B[rows])
            cand_max = _max_load(w_BX[rows], cand, num_packs)
            win = cand_max < best_B[rows] * (1 - 1e-9)
            keys[rows[win]] = cand[win]
            best_B[rows[win]] = cand_max[win]
        return keys
    return _replan_rows(w_BX, num_slots, num_packs, prev_BPS, replan, floor_B)


def _replan_rows(w_BX: np.ndarray, num_slots: int, num_packs: int, prev_BPS: np.ndarray,
                 replan: ReplanConfig, floor_B: np.ndarray | None) -> np.ndarray:
    """Movement-aware keys ``[B, R]`` from the previous layout ``prev_BPS`` (row-local ids).

    Two count candidates per row -- the previous counts, and counts moved where the per-replica
    load says it pays (``count_hysteresis``) -- each packed anchored to the previous layout and
    improved by priced swaps; a row takes the one with the lower
    ``max(max_load, floor) / mean + move_price * moves``.
    """
    num_rows, num_exp = w_BX.shape
    rows = np.arange(num_rows)
    prev_valid = np.where(prev_BPS >= 0, prev_BPS, num_exp).reshape(num_rows, -1)
    old_cnt = row_counts(prev_valid, num_exp + 1)
    old_cnt = np.maximum(old_cnt[:, :num_exp], 1)
    # rows whose experts changed (a new group on the node) may not sum to num_slots
    keep_BX = np.where((old_cnt.sum(axis=1) == num_slots)[:, None], np.minimum(old_cnt, num_packs), 0)
    fresh = keep_BX.sum(axis=1) != num_slots
    if fresh.any():
        keep_BX[fresh] = greedy_counts(w_BX[fresh], num_slots, num_packs)
    move_BX = sticky_counts(w_BX, keep_BX, num_packs, replan.count_hysteresis)
    differ = np.flatnonzero((move_BX != keep_BX).any(axis=1))
    cand_rows = np.concatenate([rows, differ])
    cnt = np.concatenate([keep_BX, move_BX[differ]])
    w, prev = w_BX[cand_rows], prev_BPS[cand_rows]
    home_BPK = np.zeros((cand_rows.size, num_packs, num_exp + 1), dtype=bool)
    home_BPK[np.arange(cand_rows.size)[:, None, None], np.arange(num_packs)[None, :, None],
             np.where(prev >= 0, prev, num_exp)] = True
    home_BPK = home_BPK[:, :, :num_exp]
    max_moves = None
    if replan.max_move_fraction is not None:
        max_moves = np.full(cand_rows.size, int(replan.max_move_fraction * num_slots))
    floor = None if floor_B is None else floor_B[cand_rows] * (1.0 - replan.bottleneck_margin)
    # under a hard budget every replica that still has a place stays (only count changes move)
    slack = np.inf if max_moves is not None else replan.anchor_slack
    keys = _improve(w, _anchored_layout(w, cnt, prev, slack), home_BPK,
                    replan.move_price, max_moves, floor)
    if differ.size == 0:
        return keys
    key_CPS = keys.reshape(-1, num_packs, num_slots // num_packs)
    away = (~home_BPK[np.arange(cand_rows.size)[:, None, None], np.arange(num_packs)[None, :, None],
                      key_CPS]).sum(axis=(1, 2))
    if max_moves is not None:
        # an over-budget candidate (count changes alone can exceed it) is never preferred
        away = np.where(away > max_moves, np.inf, away)
    mean = np.maximum(w.sum(axis=1) / num_packs, 1e-300)
    top = _max_load(w, keys, num_packs)
    if floor is not None:
        top = np.maximum(top, floor)
    score = top / mean + replan.move_price * away
    out = keys[:num_rows].copy()
    better = score[num_rows:] < score[differ]
    out[differ[better]] = keys[num_rows:][better]
    return out


def _fresh_rows(w_BX: np.ndarray, num_slots: int, num_packs: int, cap_B: np.ndarray) -> np.ndarray:
    """Fresh layout keys ``[B, R]``: counts (capped per row), LPT, swaps, count search, swaps."""
    num_rows = w_BX.shape[0]
    cnt_BX = greedy_counts(w_BX, num_slots, cap_B)
    keys = _improve(w_BX, _fresh_layout(w_BX, cnt_BX, num_packs), None, 0.0, None)
    keys = retarget_search(keys.reshape(num_rows, num_packs, -1), w_BX, cap_B)
    return _improve(w_BX, keys.reshape(num_rows, num_packs, -1), None, 0.0, None)


def _max_load(w_BX: np.ndarray, key_BR: np.ndarray, num_packs: int) -> np.ndarray:
    rw_BR = np.take_along_axis(w_BX / _counts(key_BR, w_BX.shape[1]), key_BR, axis=1)
    return rw_BR.reshape(key_BR.shape[0], num_packs, -1).sum(axis=2).max(axis=1)


def _counts(key_BR: np.ndarray, num_exp: int) -> np.ndarray:
    return row_counts(key_BR, num_exp)


def _improve(w_BX: np.ndarray, key_BPS: np.ndarray, home_BPK: np.ndarray | None,
             move_price: float, max_moves: np.ndarray | None, floor_B: np.ndarray | None = None) -> np.ndarray:
    """Swap local search on a layout of keys ``[B, P, S]``; returns keys ``[B, R]``."""
    num_rows, num_exp = w_BX.shape
    rows = np.arange(num_rows)[:, None]
    key_BR = key_BPS.reshape(num_rows, -1)
    cnt_BX = _counts(key_BR, num_exp)
    rw_BR = (w_BX / cnt_BX)[rows, key_BR]
    items = np.broadcast_to(np.arange(key_BR.shape[1]), key_BR.shape).reshape(key_BPS.shape)
    item_BPS = swap_search(items, rw_BR, key_BR, num_exp, home_BPK=home_BPK, move_price=move_price,
                           max_moves_B=max_moves, floor_B=floor_B)
    return np.take_along_axis(key_BR, item_BPS.reshape(num_rows, -1), axis=1)


def moekit_placement(load_LE: np.ndarray, config: PlacementConfig, previous_LR: np.ndarray | None = None,
                     replan: ReplanConfig = ReplanConfig()) -> np.ndarray:
    """moekit's layout ``phy2log [L, R]`` for ``load_LE [L, E]`` (see the module docstring)."""
    num_layers, num_exp = load_LE.shape
    config.check_experts(num_exp)
    exp_per_row = num_exp // config.num_nodes if config.hierarchical else num_exp
    if config.slots_per_gpu > exp_per_row:
        raise ValueError(
            f"num_replicas: expected at most {exp_per_row * config.num_gpus} (R / P slots per GPU "
            f"<= {exp_per_row} experts it can choose from) so no GPU holds two replicas of one "
            f"expert, got {config.num_replicas}"
        )
    if not config.hierarchical:
        prev = None if previous_LR is None else previous_LR.reshape(num_layers, config.num_gpus, -1)
        return _place_rows(load_LE, config.num_replicas, config.num_gpus, prev, replan)
    G, N = config.num_groups, config.num_nodes
    group_size, exp_per_node = num_exp // G, num_exp // N
    slots_per_node, gpus_per_node = config.num_replicas // N, config.num_gpus // N
    rows_L = np.arange(num_layers)[:, None]
    group_w_LG = load_LE.reshape(num_layers, G, group_size).sum(axis=2)
    node_LG = None
    if previous_LR is not None:
        node_LG = _groups_nodes_of(previous_LR, num_exp, G, N)
    if node_LG is None:
        pack, rank = lpt_pack(group_w_LG, N)
        items = swap_search(arrange(pack, rank, N), group_w_LG)
    else:
        # start from where the groups are; a group changes node only when the lighter heaviest
        # node pays for copying all its replicas (about R / G slots)
        items = np.argsort(node_LG, axis=1, kind="stable").reshape(num_layers, N, G // N)
        home = np.zeros((num_layers, N, G), dtype=bool)
        home[rows_L, node_LG, np.arange(G)[None, :]] = True
        groups = np.broadcast_to(np.arange(G), (num_layers, G))
        items = swap_search(items, group_w_LG, groups, G, home_BPK=home,
                            move_price=replan.move_price * config.num_replicas / G * replan.group_move_discount)
    node_LG = np.empty((num_layers, G), dtype=np.int64)
    node_LG[rows_L, items.reshape(num_layers, -1)] = np.repeat(np.arange(N), G // N)[None, :]
    # node-major expert positions: groups of node n (in group order) fill n*exp_per_node...
    order_LG = np.argsort(node_LG, axis=1, kind="stable")
    pos_of_group = np.empty_like(order_LG)
    pos_of_group[rows_L, order_LG] = np.arange(G)[None, :]
    log2pos_LE = (pos_of_group[:, :, None] * group_size + np.arange(group_size)).reshape(num_layers, num_exp)
    pos2log_LE = np.empty_like(log2pos_LE)
    pos2log_LE[rows_L, log2pos_LE] = np.arange(num_exp)[None, :]
    node_w_BX = np.take_along_axis(load_LE, pos2log_LE, axis=1).reshape(-1, exp_per_node)
    prev_BPS = None
    if previous_LR is not None:
        pos_prev = np.take_along_axis(log2pos_LE, previous_LR, axis=1).reshape(num_layers, N, slots_per_node)
        local = pos_prev - (np.arange(N) * exp_per_node)[None, :, None]
        local = np.where((local >= 0) & (local < exp_per_node), local, -1)
        prev_BPS = local.reshape(num_layers * N, gpus_per_node, -1)
    # a node below the layer's bottleneck need not move anything to get better: when replanning,
    # its GPUs only have to stay under the heaviest node's mean GPU load (a lower bound of the
    # layer's max) less a margin that keeps some headroom for the next window's noise
    node_load_LN = node_w_BX.sum(axis=1).reshape(num_layers, N)
    floor_B = np.repeat(node_load_LN.max(axis=1) / gpus_per_node, N)
    key_BR = _place_rows(node_w_BX, slots_per_node, gpus_per_node, prev_BPS, replan, floor_B)
    node_off = (np.arange(num_layers * N) % N * exp_per_node)[:, None]
    pos_LR = (key_BR + node_off).reshape(num_layers, -1)
    return np.take_along_axis(pos2log_LE, pos_LR, axis=1)


def _groups_nodes_of(phy2log_LR: np.ndarray, num_exp: int, G: int, N: int) -> np.ndarray | None:
    """Node of every group in a previous plan ``[L, G]``, or ``None`` unless every group sits on
    exactly one node and every node holds ``G / N`` groups."""
    num_layers, num_slots = phy2log_LR.shape
    group_LR = phy2log_LR // (num_exp // G)
    node_R = np.arange(num_slots) // (num_slots // N)
    seen = np.zeros((num_layers, G, N), dtype=bool)
    seen[np.arange(num_layers)[:, None], group_LR, node_R[None, :]] = True
    if not np.all(seen.sum(axis=2) == 1):
        return None
    node_LG = seen.argmax(axis=2)
    per_node = np.stack([np.bincount(row, minlength=N) for row in node_LG])
    return node_LG if np.all(per_node == G // N) else None


def plan(load, config: PlacementConfig, previous=None, *, algorithm: str = "moekit",
         replan: ReplanConfig | None = None) -> Plan:
    """Place ``config.num_replicas`` expert slots per layer for ``load``.

    load: ``[L, E]`` (or ``[E]``) non-negative expected tokens per expert for the *coming*
        window (see :func:`~moekit.placement.predict_load` to get it from a trace).
    previous: a :class:`Plan` or a ``phy2log [L, R]`` array/tensor of the plan in service. With
        ``algorithm="moekit"`` the planner keeps experts where they are unless moving pays
        (``replan``, a :class:`ReplanConfig`); ``plan.moves`` counts the copies.
    algorithm: ``"moekit"`` or ``"eplb"`` (moekit's rewrite of EPLB's published algorithm,
        which ignores ``previous`` except to count moves).

    Returns a :class:`Plan` whose figures (GPU loads, balancedness) are on ``load``.
    """
    load_LE = check_load(load)
    if not isinstance(config, PlacementConfig):
        raise ValueError(f"config: expected a PlacementConfig, got {type(config).__name__}")
    if replan is not None and not isinstance(replan, ReplanConfig):
        raise ValueError(f"replan: expected a ReplanConfig, got {type(replan).__name__}")
    config.check_experts(load_LE.shape[1])
    prev_LR = None
    if previous is not None:
        p2l = previous.phy2log if isinstance(previous, Plan) else previous
        prev_LR = check_phy2log(p2l, load_LE.shape[1], config, "previous")
        if prev_LR.shape[0] != load_LE.shape[0]:
            raise ValueError(f"previous: expected {load_LE.shape[0]} layers like load, got {prev_LR.shape[0]}")
    if algorithm == "eplb":
        phy2log, rank = eplb_placement(load_LE, config)
        return Plan.from_phy2log(phy2log, load_LE, config, "eplb", prev_LR, rank)
    if algorithm != "moekit":
        raise ValueError(f"algorithm: expected 'moekit' or 'eplb', got {algorithm!r}")
    phy2log = moekit_placement(load_LE, config, prev_LR, replan or ReplanConfig())
    return Plan.from_phy2log(phy2log, load_LE, config, "moekit", prev_LR)


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int, *, algorithm: str = "moekit"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in for DeepSeek EPLB's ``rebalance_experts``.

    weight: ``[L, E]`` load statistics of all logical experts. num_replicas: ``R`` physical
    experts (a multiple of ``num_gpus``). num_groups / num_nodes / num_gpus: as in EPLB; groups
    are kept on nodes when ``num_nodes`` divides ``num_groups`` (hierarchical), else global.

    Returns ``phy2log [L, R]``, ``log2phy [L, E, R - E + 1]`` (padded with -1) and
    ``logcnt [L, E]``, int64 tensors on ``weight``'s device.
    """
    config = PlacementConfig(num_replicas, num_groups, num_nodes, num_gpus)
    device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
    load_LE = check_load(weight, "weight")
    config.check_experts(load_LE.shape[1])
    if algorithm == "eplb":
        phy2log, rank = eplb_placement(load_LE, config)
    elif algorithm == "moekit":
        phy2log, rank = moekit_placement(load_LE, config), None
    else:
        raise ValueError(f"algorithm: expected 'moekit' or 'eplb', got {algorithm!r}")
    log2phy, logcnt = build_log2phy(phy2log, load_LE.shape[1], rank)
    return (torch.from_numpy(phy2log).to(device), torch.from_numpy(log2phy).to(device),
            torch.from_numpy(logcnt).to(device))
