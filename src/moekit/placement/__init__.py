"""Expert placement: replicate hot experts and pack replicas onto GPUs (EPLB-compatible).

- :func:`rebalance_experts`: DeepSeek EPLB's signature and outputs, moekit's planner inside
  (``algorithm="eplb"`` runs moekit's rewrite of EPLB's published algorithm).
- :func:`plan` -> :class:`Plan`: movement-aware replanning, figures, JSON round trip.
- :func:`predict_load`: next-window load from a routing trace (window sum or EMA).
- :func:`solve_exact`: optimal placement of a small layer through an ILP (highspy).
- :func:`rolling_evaluation`: plan on window t, score on window t+1, over a whole trace.
"""

from moekit.placement.config import PlacementConfig, ReplanConfig
from moekit.placement.evaluate import rolling_evaluation
from moekit.placement.exact import solve_exact
from moekit.placement.result import Plan, nodes_per_group
from moekit.placement.planner import plan, rebalance_experts
from moekit.placement.predict import predict_load

__all__ = [
    "PlacementConfig",
    "ReplanConfig",
    "Plan",
    "plan",
    "rebalance_experts",
    "predict_load",
    "solve_exact",
    "rolling_evaluation",
    "nodes_per_group",
]
