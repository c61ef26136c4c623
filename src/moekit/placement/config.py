"""Placement configuration and input checks shared by every planner.

Shapes: ``L`` layers, ``E`` logical experts, ``G`` expert groups, ``N`` nodes, ``P`` GPUs,
``R`` physical expert slots (replicas) in all, ``S = R / P`` slots per GPU. Physical slot ``r``
lives on GPU ``r // S``; GPU ``p`` lives on node ``p // (P / N)`` (the layout EPLB uses).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["PlacementConfig", "ReplanConfig", "check_load"]


@dataclass(frozen=True)
class PlacementConfig:
    """Where ``num_replicas`` physical experts go on ``num_gpus`` GPUs of ``num_nodes`` nodes.

    num_replicas: ``R`` physical slots per layer (``R >= E``, ``R % P == 0``).
    num_groups: ``G`` expert groups (experts ``e`` with equal ``e // (E / G)`` share a group, as in
        group-limited routing).
    num_nodes, num_gpus: ``N`` nodes, ``P`` GPUs (``P % N == 0``).
    keep_groups_on_nodes: keep every replica of a group's experts on one node, so group-limited
        routing reaches at most ``topk_group`` nodes (EPLB's hierarchical policy). ``None`` (the
        default) does what EPLB does: keep them when ``N > 1`` and ``G % N == 0``, else plan
        globally. ``True`` requires ``G % N == 0`` and ``E % G == 0``.
    """

    num_replicas: int
    num_groups: int = 1
    num_nodes: int = 1
    num_gpus: int = 1
    keep_groups_on_nodes: bool | None = None

    def __post_init__(self) -> None:
        for name in ("num_replicas", "num_groups", "num_nodes", "num_gpus"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"{name}: expected a positive integer, got {val!r}")
        if self.num_replicas % self.num_gpus:
            raise ValueError(
                f"num_replicas: expected a multiple of num_gpus={self.num_gpus}, got {self.num_replicas}"
            )
        if self.num_gpus % self.num_nodes:
            raise ValueError(f"num_gpus: expected a multiple of num_nodes={self.num_nodes}, got {self.num_gpus}")
        if self.keep_groups_on_nodes and self.num_groups % self.num_nodes:
            raise ValueError(
                f"num_groups: expected a multiple of num_nodes={self.num_nodes} to keep groups on "
                f"nodes, got {self.num_groups}"
            )

    @property
    def slots_per_gpu(self) -> int:
        return self.num_replicas // self.num_gpus

    @property
    def hierarchical(self) -> bool:
        """Whether groups are kept on nodes (resolves the ``None`` default like EPLB)."""
        if self.keep_groups_on_nodes is None:
            return self.num_nodes > 1 and self.num_groups % self.num_nodes == 0
        return bool(self.keep_groups_on_nodes)

    def check_experts(self, num_experts: int) -> None:
        """Raise ``ValueError`` unless ``E`` experts fit this configuration."""
        if self.num_replicas < num_experts:
            raise ValueError(
                f"num_replicas: expected at least num_experts={num_experts}, got {self.num_replicas}"
            )
        if self.hierarchical:
            if num_experts % self.num_groups:
                raise ValueError(
                    f"num_groups: expected a divisor of num_experts={num_experts}, got {self.num_groups}"
                )
            per_node = self.num_replicas // self.num_nodes
            if self.num_replicas % self.num_nodes or per_node < num_experts // self.num_nodes:
                raise ValueError(
                    f"num_replicas: expected a multiple of num_nodes={self.num_nodes} with room for "
                    f"{num_experts // self.num_nodes} experts per node, got {self.num_replicas}"
                )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ReplanConfig:
    """How movement-aware replanning (``plan(..., previous=...)``) trades balance for moves.

    move_price: cost of copying one expert to a GPU, in units of the layer's mean GPU load; a
        swap is taken only if it lowers the heaviest GPU by more than ``move_price`` times the
        mean load per new copy (0.003: a copy must buy 0.3% of the mean).
    max_move_fraction: optional budget: swaps stop at this share of a row's slots moved, and
        every replica keeps its GPU unless its expert's count changed (count changes that would
        exceed the budget are not taken, unless the row's experts changed node).
    count_hysteresis: a replica moves to another expert only if that expert's load per replica
        exceeds the donor's (after the loss) by this factor (0.3: by 30%).
    anchor_slack: during the initial packing a replica stays on its GPU while that GPU is
        within ``1 + anchor_slack`` of the mean load (1.0: keep everything that fits; the swap
        search then moves only what pays).
    group_move_discount: with groups kept on nodes, moving a group costs ``move_price`` times its
        ``R / G`` slots times this discount: a group move rebalances whole nodes, which a
        per-GPU price undervalues (0.1 was the best trade-off on the benchmark's traces).
    bottleneck_margin: with groups kept on nodes, swaps on a node pay off only above
        ``(1 - margin)`` times the heaviest node's mean GPU load (lighter nodes cannot set the
        layer's maximum; the margin keeps headroom for the next window's noise).
    """

    move_price: float = 0.003
    max_move_fraction: float | None = None
    count_hysteresis: float = 0.3
    anchor_slack: float = 1.0
    group_move_discount: float = 0.1
    bottleneck_margin: float = 0.1

    def __post_init__(self) -> None:
        for name in ("move_price", "count_hysteresis", "anchor_slack", "group_move_discount",
                     "bottleneck_margin"):
            val = getattr(self, name)
            if not isinstance(val, (int, float)) or not np.isfinite(val) or val < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {val!r}")
        frac = self.max_move_fraction
        if frac is not None and not (isinstance(frac, (int, float)) and 0 <= frac <= 1):
            raise ValueError(f"max_move_fraction: expected a fraction in [0, 1] or None, got {frac!r}")


def check_load(load, name: str = "load") -> np.ndarray:
    """Return ``load`` as float64 ``[L, E]`` (a ``[E]`` input becomes one layer).

    Raises ``ValueError`` for NaN/inf, negative values or a shape that is not 1-D/2-D.
    """
    if hasattr(load, "detach"):
        load = load.detach().to("cpu").double().numpy()
    try:
        arr = np.array(load, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a numeric array [layers, experts] ({exc})") from exc
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name}: expected shape [layers, experts], got {tuple(np.shape(load))}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    if np.any(arr < 0):
        raise ValueError(f"{name}: expected non-negative loads, got a negative value")
    return arr
