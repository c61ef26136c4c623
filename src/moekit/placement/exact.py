"""Exact placement of one small layer through a mixed-integer program (HiGHS via ``highspy``).

Used to measure the optimality gap of the heuristic planner on small instances (the model has
``E * P * K`` variables, ``K = min(P, R - E + 1)``, so keep ``E * P`` in the tens to hundreds).

Model (global policy: no group/node limits), for a load ``w [E]``, ``R`` slots on ``P`` GPUs
of ``S = R / P`` slots:

- ``x[e, g]`` in {0, 1}: GPU ``g`` holds a replica of ``e`` (never two); every GPU holds ``S``;
- ``y[e, k]`` in {0, 1}: expert ``e`` has exactly ``k`` replicas (``sum_k y = 1``,
  ``sum_g x[e, g] = sum_k k y[e, k]``);
- ``u[e, g]`` in [0, 1]: the share of ``w_e`` that GPU ``g`` serves: ``u <= x``,
  ``u <= sum_k y / k``, ``u >= sum_k y / k - (1 - x)``, ``sum_g u[e, g] = 1`` (equal split over
  the replicas, and a tight LP relaxation);
- GPU load ``sum_e w_e u[e, g] <= T``, loads ordered over GPUs (a valid symmetry cut: GPUs are
  interchangeable); minimise ``T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moekit.placement.config import PlacementConfig, check_load

__all__ = ["ExactResult", "solve_exact"]


@dataclass(frozen=True)
class ExactResult:
    """phy2log: int64 ``[R]`` optimal layout (slot ``r`` on GPU ``r // S``); max_load: its
    heaviest GPU; lower_bound: the solver's proven bound; optimal: proven within tolerance."""

    phy2log: np.ndarray
    max_load: float
    lower_bound: float
    optimal: bool


def solve_exact(load, config: PlacementConfig, *, time_limit: float = 10.0) -> ExactResult:
    """Minimise the heaviest GPU's load of one layer exactly (``load``: ``[E]`` or ``[1, E]``)."""
    import highspy

    w = check_load(load)
    if w.shape[0] != 1:
        raise ValueError(f"load: expected one layer [E], got {w.shape[0]} layers")
    w = w[0]
    E, R, P, S = w.size, config.num_replicas, config.num_gpus, config.slots_per_gpu
    config.check_experts(E)
    if S > E:
        raise ValueError(f"num_replicas: expected at most {E * P} so no GPU needs two replicas of one expert")
    K = min(P, R - E + 1)
    nx, ny, nu = E * P, E * K, E * P
    ix = lambda e, g: e * P + g                                   # noqa: E731
    iy = lambda e, k: nx + e * K + (k - 1)                        # noqa: E731
    iu = lambda e, g: nx + ny + e * P + g                         # noqa: E731
    it = nx + ny + nu
    ncol = it + 1
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("threads", 1)
    inf = highspy.kHighsInf
    lower = np.zeros(ncol)
    upper = np.ones(ncol)
    upper[it] = inf
    cost = np.zeros(ncol)
    cost[it] = 1.0
    h.addVars(ncol, lower, upper)
    h.changeColsCost(ncol, np.arange(ncol, dtype=np.int32), cost)
    integrality = np.array([highspy.HighsVarType.kInteger] * (nx + ny) + [highspy.HighsVarType.kContinuous] * (nu + 1))
    h.changeColsIntegrality(ncol, np.arange(ncol, dtype=np.int32), integrality)

    def row(lo: float, hi: float, cols: list[int], vals: list[float]) -> None:
        h.addRow(lo, hi, len(cols), np.asarray(cols, dtype=np.int32), np.asarray(vals, dtype=np.float64))

    ks = list(range(1, K + 1))
    for e in range(E):
        row(1, 1, [iy(e, k) for k in ks], [1.0] * K)
        row(0, 0, [ix(e, g) for g in range(P)] + [iy(e, k) for k in ks], [1.0] * P + [-float(k) for k in ks])
        row(1, 1, [iu(e, g) for g in range(P)], [1.0] * P)
        for g in range(P):
            row(-inf, 0, [iu(e, g), ix(e, g)], [1.0, -1.0])
            row(-inf, 0, [iu(e, g)] + [iy(e, k) for k in ks], [1.0] + [-1.0 / k for k in ks])
            row(-1, inf, [iu(e, g), ix(e, g)] + [iy(e, k) for k in ks], [1.0, -1.0] + [-1.0 / k for k in ks])
    for g in range(P):
        row(S, S, [ix(e, g) for e in range(E)], [1.0] * E)
        row(-inf, 0, [iu(e, g) for e in range(E)] + [it], list(w) + [-1.0])
        if g + 1 < P:
            row(0, inf, [iu(e, g) for e in range(E)] + [iu(e, g + 1) for e in range(E)], list(w) + list(-w))
    h.run()
    status = h.getModelStatus()
    sol = np.asarray(h.getSolution().col_value)
    if sol.size != ncol:
        raise RuntimeError(f"highspy found no solution ({h.modelStatusToString(status)})")
    x = sol[:nx].reshape(E, P) > 0.5
    phy2log = np.concatenate([np.flatnonzero(x[:, g]) for g in range(P)]).astype(np.int64)
    cnt = x.sum(axis=1)
    max_load = float((x * (w / cnt)[:, None]).sum(axis=0).max())
    info = h.getInfo()
    return ExactResult(phy2log=phy2log, max_load=max_load, lower_bound=float(info.mip_dual_bound),
                       optimal=status == highspy.HighsModelStatus.kOptimal)
