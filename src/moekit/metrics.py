"""Balance, specialization and placement metrics: one definition each (see DESIGN.md).

All functions take routing *counts* (number of token-to-expert assignments), never
probabilities, and accept numpy arrays or torch tensors. Results are plain Python floats or
numpy arrays so reports and JSON files can use them directly.

Shapes use the letters ``L`` layers, ``E`` logical experts, ``D`` domains, ``R`` physical
expert slots (replicas), ``P`` GPUs.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "max_vio",
    "coefficient_of_variation",
    "load_entropy",
    "specialization",
    "gpu_loads",
    "balancedness",
    "moves",
    "nodes_per_group",
]


def _as_np(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    if np.any(arr < 0):
        raise ValueError(f"{name}: expected non-negative counts/loads, got a negative value")
    return arr


def _as_layers(x, name: str) -> np.ndarray:
    arr = _as_np(x, name)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected shape [E] or [L, E], got {tuple(arr.shape)}")
    return arr


def max_vio(counts) -> np.ndarray:
    """MaxVio per layer: ``(max_e c_e - mean_e c_e) / mean_e c_e``.

    counts: ``[E]`` or ``[L, E]`` assignments in one window. Returns ``[L]`` (0 for a layer
    with no assignments at all). Report ``.mean()`` over layers.
    """
    c_LE = _as_layers(counts, "counts")
    mean_L = c_LE.mean(axis=1)
    out = np.zeros_like(mean_L)
    nz = mean_L > 0
    out[nz] = (c_LE[nz].max(axis=1) - mean_L[nz]) / mean_L[nz]
    return out


def coefficient_of_variation(counts) -> np.ndarray:
    """Coefficient of variation of the expert load per layer: ``std_e c_e / mean_e c_e`` ([L])."""
    c_LE = _as_layers(counts, "counts")
    mean_L = c_LE.mean(axis=1)
    out = np.zeros_like(mean_L)
    nz = mean_L > 0
    out[nz] = c_LE[nz].std(axis=1) / mean_L[nz]
    return out


def load_entropy(counts, normalized: bool = True) -> np.ndarray:
    """Entropy of the expert-load distribution per layer ([L]).

    With ``normalized`` the entropy is divided by ``log E`` so 1 means perfectly uniform.
    """
    c_LE = _as_layers(counts, "counts")
    tot = c_LE.sum(axis=1, keepdims=True)
    p = np.divide(c_LE, tot, out=np.zeros_like(c_LE), where=tot > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    if normalized:
        h = h / math.log(c_LE.shape[1]) if c_LE.shape[1] > 1 else np.zeros_like(h)
    return h


def specialization(counts_LDE, k: int) -> dict[str, float]:
    """Domain specialization of routing.

    counts_LDE: ``[L, D, E]`` (or ``[D, E]`` for one layer) assignments of tokens of domain
    ``d`` to expert ``e``. ``k``: experts per token (for ``topk_share``).

    Returns means over layers and domains of ``top1_share`` (share of a domain's assignments
    taken by its most used expert) and ``topk_share`` (share taken by its ``k`` most used
    experts), and the mean over layers of ``nmi`` = I(domain; expert) / H(expert).
    """
    c = _as_np(counts_LDE, "counts_LDE")
    if c.ndim == 2:
        c = c[None]
    if c.ndim != 3:
        raise ValueError(f"counts_LDE: expected shape [L, D, E] or [D, E], got {tuple(c.shape)}")
    num_experts = c.shape[2]
    if not 1 <= k <= num_experts:
        raise ValueError(f"k: expected 1 <= k <= {num_experts}, got {k}")
    tot_LD = c.sum(axis=2)
    sorted_c = -np.sort(-c, axis=2)
    valid = tot_LD > 0
    top1 = np.divide(sorted_c[..., 0], tot_LD, out=np.zeros_like(tot_LD), where=valid)
    topk = np.divide(sorted_c[..., :k].sum(axis=2), tot_LD, out=np.zeros_like(tot_LD), where=valid)
    nmi_L = []
    for c_DE in c:
        total = c_DE.sum()
        if total <= 0:
            nmi_L.append(0.0)
            continue
        p_DE = c_DE / total
        p_D = p_DE.sum(axis=1, keepdims=True)
        p_E = p_DE.sum(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            mi = np.where(p_DE > 0, p_DE * np.log(p_DE / (p_D * p_E)), 0.0).sum()
            h_e = -np.where(p_E > 0, p_E * np.log(p_E), 0.0).sum()
        nmi_L.append(float(mi / h_e) if h_e > 0 else 0.0)
    return {
        "top1_share": float(top1[valid].mean()) if valid.any() else 0.0,
        "topk_share": float(topk[valid].mean()) if valid.any() else 0.0,
        "nmi": float(np.mean(nmi_L)),
    }


def gpu_loads(load_LE, phy2log_LR, num_gpus: int) -> np.ndarray:
    """Per-GPU load of a placement, ``[L, P]``.

    Each logical expert's load is split evenly over its replicas; physical slot ``r`` lives on
    GPU ``r // (R / P)``. load_LE: ``[L, E]`` (or ``[E]``); phy2log_LR: ``[L, R]`` logical
    expert of each physical slot.
    """
    load = _as_layers(load_LE, "load")
    p2l = np.asarray(phy2log_LR.detach().cpu() if hasattr(phy2log_LR, "detach") else phy2log_LR)
    if p2l.ndim == 1:
        p2l = p2l[None]
    if p2l.ndim != 2 or p2l.shape[0] != load.shape[0]:
        raise ValueError(f"phy2log: expected shape [L={load.shape[0]}, R], got {tuple(p2l.shape)}")
    num_layers, num_slots = p2l.shape
    if num_gpus <= 0 or num_slots % num_gpus:
        raise ValueError(f"num_gpus: expected a divisor of R={num_slots}, got {num_gpus}")
    if p2l.min() < 0 or p2l.max() >= load.shape[1]:
        raise ValueError(f"phy2log: expected expert ids in [0, {load.shape[1]}), got {p2l.min()}..{p2l.max()}")
    rows = np.arange(num_layers)[:, None]
    replicas_LE = np.zeros_like(load)
    np.add.at(replicas_LE, (rows, p2l), 1.0)
    if np.any(replicas_LE == 0):
        raise ValueError("phy2log: expected every logical expert to have at least one replica")
    slot_load_LR = load[rows, p2l] / replicas_LE[rows, p2l]
    return slot_load_LR.reshape(num_layers, num_gpus, num_slots // num_gpus).sum(axis=2)


def balancedness(load_LE, phy2log_LR, num_gpus: int) -> float:
    """``mean_gpu load / max_gpu load`` per layer, averaged over layers with equal weight.

    A layer with no load at all counts as perfectly balanced (1.0).
    """
    g_LP = gpu_loads(load_LE, phy2log_LR, num_gpus)
    mx = g_LP.max(axis=1)
    per_layer = np.where(mx > 0, g_LP.mean(axis=1) / np.where(mx > 0, mx, 1.0), 1.0)
    return float(per_layer.mean())


def moves(old_phy2log_LR, new_phy2log_LR, num_gpus: int) -> int:
    """Number of ``(layer, gpu, logical expert)`` pairs the new plan holds that the old did not.

    Each such pair is one expert's weights copied to a GPU. Both plans: ``[L, R]`` with the
    same ``R``.
    """
    old = np.asarray(old_phy2log_LR.cpu() if hasattr(old_phy2log_LR, "cpu") else old_phy2log_LR)
    new = np.asarray(new_phy2log_LR.cpu() if hasattr(new_phy2log_LR, "cpu") else new_phy2log_LR)
    if old.ndim == 1:
        old, new = old[None], new[None]
    if old.shape != new.shape:
        raise ValueError(f"new_phy2log: expected shape {old.shape} like the old plan, got {new.shape}")
    num_layers, num_slots = old.shape
    if num_gpus <= 0 or num_slots % num_gpus:
        raise ValueError(f"num_gpus: expected a divisor of R={num_slots}, got {num_gpus}")
    num_experts = int(max(old.max(), new.max())) + 1
    gpu_of_slot = np.arange(num_slots) // (num_slots // num_gpus)
    rows = np.arange(num_layers)[:, None]

    def holds(p2l: np.ndarray) -> np.ndarray:  # [L, P, E] bool: GPU p holds expert e
        out = np.zeros((num_layers, num_gpus, num_experts), dtype=bool)
        out[rows, gpu_of_slot[None, :], p2l] = True
        return out

    return int((holds(new) & ~holds(old)).sum())


def nodes_per_group(phy2log_LR, num_experts: int, num_groups: int, num_nodes: int) -> float:
    """Mean over layers and groups of the number of nodes holding a replica of the group.

    Experts ``e`` with equal ``e // (E / G)`` form a group. 1.0 means group-limited routing to
    ``topk_group`` groups reaches at most ``topk_group`` nodes.
    """
    p2l = np.asarray(phy2log_LR.cpu() if hasattr(phy2log_LR, "cpu") else phy2log_LR)
    num_layers, num_slots = p2l.shape
    if num_groups < 1 or num_experts % num_groups:
        # without a valid grouping every expert is its own group
        num_groups = num_experts
    group_LR = p2l // (num_experts // num_groups)
    node_R = np.arange(num_slots) // (num_slots // num_nodes)
    seen = np.zeros((num_layers, num_groups, num_nodes), dtype=bool)
    seen[np.arange(num_layers)[:, None], group_LR, node_R[None, :]] = True
    return float(seen.sum(axis=2).mean())
