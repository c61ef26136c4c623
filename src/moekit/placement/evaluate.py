"""Rolling evaluation of a planner on a routing trace: plan on window t, score on window t+1.

Shapes: ``T`` steps, ``L`` layers, ``E`` experts, ``R`` slots, ``P`` GPUs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from moekit.metrics import balancedness, moves
from moekit.placement.config import PlacementConfig, ReplanConfig
from moekit.placement.planner import plan
from moekit.placement.predict import predict_load

__all__ = ["EvaluationResult", "rolling_evaluation"]


@dataclass
class EvaluationResult:
    """Per replan ``i`` (planned after window ``t_i``, scored on window ``t_i + 1``):

    balancedness: DESIGN.md balancedness of the plan on the *next* window's counts.
    planned_balancedness: the same on the load the plan was made for.
    moves: (GPU, expert) copies from the previous plan of the same run (first replan: none).
    plan_seconds: wall time of the ``plan`` call.
    slots: ``L * R``, to turn moves into a share of all slots.
    """

    balancedness: list[float] = field(default_factory=list)
    planned_balancedness: list[float] = field(default_factory=list)
    moves: list[int] = field(default_factory=list)
    plan_seconds: list[float] = field(default_factory=list)
    nodes_per_group: float = 1.0
    slots: int = 0

    def summary(self) -> dict[str, float]:
        """Means over replans (moves over replans that had a previous plan)."""
        moves = self.moves[1:]
        return {
            "balancedness": float(np.mean(self.balancedness)),
            "balancedness_min": float(np.min(self.balancedness)),
            "planned_balancedness": float(np.mean(self.planned_balancedness)),
            "moves_per_replan": float(np.mean(moves)) if moves else 0.0,
            "moved_slot_share": float(np.mean(moves) / self.slots) if moves else 0.0,
            "plan_ms_median": float(np.median(self.plan_seconds) * 1e3),
            "nodes_per_group": self.nodes_per_group,
            "replans": len(self.balancedness),
        }

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


def rolling_evaluation(counts_TLE, config: PlacementConfig, *, window: int, algorithm: str = "moekit",
                       predictor: str = "ema", halflife: float = 8.0, risk: float = 0.0, use_previous: bool = False,
                       oracle: bool = False, warmup_windows: int = 1,
                       replan: ReplanConfig | None = None,
                       on_replan: Callable[[int, int], None] | None = None) -> EvaluationResult:
    """Replan every ``window`` steps and score each plan on the following window.

    counts_TLE: ``[T, L, E]`` routing counts. predictor: ``"last"`` (the last window's sum, how
    EPLB is fed) or ``"ema"`` (see :func:`~moekit.placement.predict_load`). use_previous: hand
    the previous plan to ``plan`` (movement-aware replanning; moves are reported either way).
    oracle: plan on the scored window itself (an upper reference, not a usable planner).
    replan: movement-aware settings for :func:`plan`. on_replan(i, n): progress callback.
    """
    c = np.asarray(counts_TLE.detach().cpu().numpy() if hasattr(counts_TLE, "detach") else counts_TLE)
    if c.ndim != 3:
        raise ValueError(f"counts: expected shape [steps, layers, experts], got {c.shape}")
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window: expected a positive integer number of steps, got {window!r}")
    num_windows = c.shape[0] // window
    if num_windows < warmup_windows + 1 or warmup_windows < 1:
        raise ValueError(
            f"window: expected at least {warmup_windows + 1} windows of {window} steps in the trace "
            f"({c.shape[0]} steps)"
        )
    result = EvaluationResult(slots=c.shape[1] * config.num_replicas)
    previous = None
    npg = []
    replans = list(range(warmup_windows - 1, num_windows - 1))
    for i, t in enumerate(replans):
        future_LE = c[(t + 1) * window:(t + 2) * window].sum(axis=0)
        if oracle:
            load_LE = future_LE.astype(np.float64)
        else:
            load_LE = predict_load(c[:(t + 1) * window], method=predictor, window=window, halflife=halflife,
                                   risk=risk)
        start = time.perf_counter()
        new = plan(load_LE, config, previous if use_previous else None, algorithm=algorithm, replan=replan)
        result.plan_seconds.append(time.perf_counter() - start)
        result.balancedness.append(balancedness(future_LE, new.phy2log, config.num_gpus))
        result.planned_balancedness.append(new.balancedness)
        if previous is None:
            result.moves.append(0)
        else:
            result.moves.append(int(moves(previous.phy2log, new.phy2log, config.num_gpus)))
        npg.append(new.nodes_per_group)
        previous = new
        if on_replan is not None:
            on_replan(i + 1, len(replans))
    result.nodes_per_group = float(np.mean(npg))
    return result
