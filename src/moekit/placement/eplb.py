"""DeepSeek EPLB's published placement algorithm, written here from its description.

EPLB (https://github.com/deepseek-ai/EPLB) describes two policies:

- *hierarchical* (when the number of nodes divides the number of expert groups): pack the
  expert groups onto nodes with a balanced greedy packing, replicate experts within each node
  (each extra replica goes to the expert with the largest load per replica), then pack the
  node's replicas onto its GPUs with the same balanced packing;
- *global* (otherwise): the same with one group and one node.

The balanced packing visits items heaviest first and puts each in the lightest pack that still
has room. Nothing stops two replicas of one expert from landing on the same GPU; this module
keeps that behaviour on purpose, so comparisons with moekit's planner are faithful. Code here
is moekit's own and vectorised over layers; only the algorithm follows EPLB.

Shapes: ``L`` layers, ``E`` experts, ``R`` slots, ``G`` groups, ``N`` nodes, ``P`` GPUs.
"""

from __future__ import annotations

import numpy as np

from moekit.placement.config import PlacementConfig
from moekit.placement.packing import lpt_pack

__all__ = ["eplb_placement"]


def _replicate_most_loaded(weight_BX: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One replica per expert, then each extra one to the largest load per replica.

    Returns ``phy2log_BR`` (slots ``0..X-1`` are the experts themselves, later slots the extra
    replicas in the order they were chosen), ``rank_BR`` (replica index) and ``cnt_BX``.
    """
    num_rows, num_exp = weight_BX.shape
    rows = np.arange(num_rows)
    phy2log_BR = np.empty((num_rows, num_slots), dtype=np.int64)
    rank_BR = np.zeros((num_rows, num_slots), dtype=np.int64)
    phy2log_BR[:, :num_exp] = np.arange(num_exp)
    cnt_BX = np.ones((num_rows, num_exp), dtype=np.int64)
    for slot in range(num_exp, num_slots):
        pick_B = (weight_BX / cnt_BX).argmax(axis=1)
        phy2log_BR[:, slot] = pick_B
        rank_BR[:, slot] = cnt_BX[rows, pick_B]
        cnt_BX[rows, pick_B] += 1
    return phy2log_BR, rank_BR, cnt_BX


def _hierarchical(weight_LE: np.ndarray, num_slots: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    num_layers, num_exp = weight_LE.shape
    group_size = num_exp // num_groups
    groups_per_node = num_groups // num_nodes
    exp_per_node = num_exp // num_nodes
    slots_per_node = num_slots // num_nodes
    gpus_per_node = num_gpus // num_nodes
    rows_L = np.arange(num_layers)[:, None]

    # 1. groups -> nodes
    group_load_LG = weight_LE.reshape(num_layers, num_groups, group_size).sum(axis=2)
    gpack_LG, grank_LG = lpt_pack(group_load_LG, num_nodes)
    # node-major order of experts: node n holds positions n*exp_per_node ... (n+1)*exp_per_node-1
    pos_LG = (gpack_LG * groups_per_node + grank_LG) * group_size
    log2pos_LE = (pos_LG[:, :, None] + np.arange(group_size)[None, None, :]).reshape(num_layers, num_exp)
    pos2log_LE = np.empty_like(log2pos_LE)
    pos2log_LE[rows_L, log2pos_LE] = np.arange(num_exp)[None, :]

    # 2. replicate within each node: rows are (layer, node)
    node_w_BX = np.take_along_axis(weight_LE, pos2log_LE, axis=1).reshape(-1, exp_per_node)
    phy2x_BR, rank_BR, cnt_BX = _replicate_most_loaded(node_w_BX, slots_per_node)

    # 3. replicas -> GPUs of the node
    rows_B = np.arange(node_w_BX.shape[0])[:, None]
    replica_w_BR = (node_w_BX / cnt_BX)[rows_B, phy2x_BR]
    pack_BR, prank_BR = lpt_pack(replica_w_BR, gpus_per_node)
    slot_BR = pack_BR * (slots_per_node // gpus_per_node) + prank_BR
    x_at_slot_BR = np.empty_like(phy2x_BR)
    rank_at_slot_BR = np.empty_like(rank_BR)
    x_at_slot_BR[rows_B, slot_BR] = phy2x_BR
    rank_at_slot_BR[rows_B, slot_BR] = rank_BR
    node_offset_B1 = (np.arange(node_w_BX.shape[0]) % num_nodes * exp_per_node)[:, None]
    pos_LR = (x_at_slot_BR + node_offset_B1).reshape(num_layers, num_slots)
    phy2log_LR = np.take_along_axis(pos2log_LE, pos_LR, axis=1)
    return phy2log_LR, rank_at_slot_BR.reshape(num_layers, num_slots)


def eplb_placement(load_LE: np.ndarray, config: PlacementConfig) -> tuple[np.ndarray, np.ndarray]:
    """EPLB's placement of ``load_LE`` (float ``[L, E]``).

    Returns ``phy2log_LR`` (int64 ``[L, R]``, logical expert of each slot; slot ``r`` is on GPU
    ``r // (R / P)``) and ``rank_LR`` (which replica of its expert each slot is). Uses the
    hierarchical policy when ``config.hierarchical``, else the global one.
    """
    config.check_experts(load_LE.shape[1])
    if config.hierarchical:
        return _hierarchical(load_LE, config.num_replicas, config.num_groups, config.num_nodes,
                             config.num_gpus)
    return _hierarchical(load_LE, config.num_replicas, 1, 1, config.num_gpus)
