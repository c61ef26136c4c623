"""The ``Plan`` result: where every physical expert slot lives, with its figures and JSON form.

Shapes: ``L`` layers, ``E`` logical experts, ``R`` slots, ``P`` GPUs, ``M = R - E + 1`` (the
most replicas one expert can have; ``log2phy``'s last dimension, as in EPLB).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from moekit.metrics import balancedness as _balancedness
from moekit.metrics import gpu_loads
from moekit.metrics import moves as _moves
from moekit.metrics import nodes_per_group
from moekit.placement.config import PlacementConfig, check_load
from moekit.placement.files import read_json, write_json
from moekit.placement.replication import row_counts

__all__ = ["Plan", "build_log2phy", "nodes_per_group", "check_phy2log"]


_FORMAT = "moekit-placement-plan"


def check_phy2log(phy2log, num_experts: int, config: PlacementConfig, name: str = "phy2log") -> np.ndarray:
    """``phy2log`` as int64 ``[L, R]``; ``ValueError`` unless it is a valid placement."""
    if hasattr(phy2log, "detach"):
        phy2log = phy2log.detach().cpu().numpy()
    arr = np.asarray(phy2log)
    if arr.ndim != 2 or arr.shape[1] != config.num_replicas:
        raise ValueError(f"{name}: expected shape [layers, R={config.num_replicas}], got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integer expert ids, got {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= num_experts:
        raise ValueError(f"{name}: expected expert ids in [0, {num_experts}), got {arr.min()}..{arr.max()}")
    cnt = row_counts(arr, num_experts)
    if np.any(cnt == 0):
        raise ValueError(f"{name}: expected every logical expert to have at least one replica")
    return arr


def build_log2phy(phy2log_LR: np.ndarray, num_experts: int,
                  rank_LR: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``log2phy`` int64 ``[L, E, R - E + 1]`` (slots of each expert, padded with -1) and
    ``logcnt`` int64 ``[L, E]``. Replica ``j`` of an expert sits at ``log2phy[l, e, j]``; without
    ``rank_LR`` replicas are numbered in slot order."""
    num_layers, num_slots = phy2log_LR.shape
    rows = np.arange(num_layers)[:, None]
    logcnt = row_counts(phy2log_LR, num_experts)
    if rank_LR is None:
        order = np.argsort(phy2log_LR, axis=1, kind="stable")
        sorted_keys = np.take_along_axis(phy2log_LR, order, axis=1)
        start = np.cumsum(logcnt, axis=1) - logcnt
        rank_sorted = np.arange(num_slots)[None, :] - np.take_along_axis(start, sorted_keys, axis=1)
        rank_LR = np.empty_like(phy2log_LR)
        rank_LR[rows, order] = rank_sorted
    log2phy = np.full((num_layers, num_experts, num_slots - num_experts + 1), -1, dtype=np.int64)
    log2phy[rows, phy2log_LR, rank_LR] = np.arange(num_slots)[None, :]
    return log2phy, logcnt


@dataclass
class Plan:
    """A placement of ``R`` physical expert slots per layer.

    phy2log: int64 tensor ``[L, R]``, logical expert in each slot; slot ``r`` is on GPU
        ``r // (R / P)`` (EPLB's layout, ready for vLLM/SGLang-style code).
    log2phy: int64 tensor ``[L, E, R - E + 1]``, slots of each expert, padded with -1.
    logcnt: int64 tensor ``[L, E]``, replicas per expert.
    gpu_load: float64 ``[L, P]``, per-GPU load of the load the plan was made for.
    balancedness: ``mean/max`` GPU load on that load, averaged over layers (DESIGN.md).
    moves: (GPU, expert) copies from the previous plan, ``None`` without one.
    nodes_per_group: see :func:`nodes_per_group`.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    gpu_load: np.ndarray
    balancedness: float
    moves: int | None
    nodes_per_group: float
    config: PlacementConfig
    algorithm: str

    @classmethod
    def from_phy2log(cls, phy2log_LR, load_LE, config: PlacementConfig, algorithm: str,
                     previous_LR=None, rank_LR=None) -> "Plan":
        """Build a plan (with all its figures) from a slot layout ``[L, R]`` and ``load [L, E]``."""
        load_LE = check_load(load_LE)
        p2l = check_phy2log(phy2log_LR, load_LE.shape[1], config)
        log2phy, logcnt = build_log2phy(p2l, load_LE.shape[1], rank_LR)
        moves = None
        if previous_LR is not None:
            moves = int(_moves(check_phy2log(previous_LR, load_LE.shape[1], config, "previous"), p2l,
                               config.num_gpus))
        return cls(
            phy2log=torch.from_numpy(p2l.copy()),
            log2phy=torch.from_numpy(log2phy),
            logcnt=torch.from_numpy(logcnt),
            gpu_load=gpu_loads(load_LE, p2l, config.num_gpus),
            balancedness=_balancedness(load_LE, p2l, config.num_gpus),
            moves=moves,
            nodes_per_group=nodes_per_group(p2l, load_LE.shape[1], config.num_groups, config.num_nodes),
            config=config,
            algorithm=algorithm,
        )

    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.logcnt.shape[1])

    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": 1,
            "algorithm": self.algorithm,
            "config": self.config.to_dict(),
            "num_experts": self.num_experts,
            "balancedness": self.balancedness,
            "moves": self.moves,
            "nodes_per_group": self.nodes_per_group,
            "phy2log": self.phy2log.tolist(),
            "gpu_load": self.gpu_load.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """Inverse of :meth:`to_dict`; ``ValueError`` on anything malformed."""
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"plan: expected a JSON object with format={_FORMAT!r}")
        try:
            config = PlacementConfig(**data["config"])
            num_experts = int(data["num_experts"])
            p2l = check_phy2log(np.asarray(data["phy2log"], dtype=np.int64), num_experts, config)
            gpu_load = np.asarray(data["gpu_load"], dtype=np.float64)
            bal = float(data["balancedness"])
            moves = None if data.get("moves") is None else int(data["moves"])
            npg = float(data["nodes_per_group"])
            algorithm = str(data["algorithm"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"plan: missing or malformed field ({exc})") from exc
        if gpu_load.shape != (p2l.shape[0], config.num_gpus):
            raise ValueError(f"plan.gpu_load: expected shape {(p2l.shape[0], config.num_gpus)}, got {gpu_load.shape}")
        config.check_experts(num_experts)
        log2phy, logcnt = build_log2phy(p2l, num_experts)
        return cls(torch.from_numpy(p2l), torch.from_numpy(log2phy), torch.from_numpy(logcnt),
                   gpu_load, bal, moves, npg, config, algorithm)

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON, atomically (temporary file, then ``os.replace``)."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan written by :meth:`save`; ``ValueError`` if the file is not a valid plan."""
        data = read_json(path, "plan")
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"plan {os.fspath(path)!r}: {exc}") from exc
