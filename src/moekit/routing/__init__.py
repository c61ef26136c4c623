"""Routers and balance objectives (pure torch, CPU-testable)."""

from moekit.routing.adaptive import (
    BeamRouter,
    BeamRouterConfig,
    NullExpertsRouter,
    NullExpertsRouterConfig,
    TopPRouter,
    TopPRouterConfig,
    flops_saved,
)
from moekit.routing.balance import (
    AuxFreeBias,
    GlobalBalance,
    all_reduce_counts,
    sequence_switch_loss,
    switch_loss,
    z_loss,
)
from moekit.routing.capacity import apply_capacity, expert_capacity
from moekit.routing.special import (
    DenseToSparseRouter,
    DenseToSparseRouterConfig,
    ExpertChoiceRouter,
    ExpertChoiceRouterConfig,
)
from moekit.routing.topk import (
    GroupLimitedRouter,
    GroupLimitedRouterConfig,
    MoGERouter,
    MoGERouterConfig,
    TopKRouter,
    TopKRouterConfig,
)
from moekit.routing.types import Routing, RouterOutput, count_assignments

__all__ = [
    "Routing",
    "RouterOutput",
    "count_assignments",
    "TopKRouter",
    "TopKRouterConfig",
    "GroupLimitedRouter",
    "GroupLimitedRouterConfig",
    "MoGERouter",
    "MoGERouterConfig",
    "NullExpertsRouter",
    "NullExpertsRouterConfig",
    "TopPRouter",
    "TopPRouterConfig",
    "BeamRouter",
    "BeamRouterConfig",
    "DenseToSparseRouter",
    "DenseToSparseRouterConfig",
    "ExpertChoiceRouter",
    "ExpertChoiceRouterConfig",
    "flops_saved",
    "switch_loss",
    "sequence_switch_loss",
    "z_loss",
    "GlobalBalance",
    "AuxFreeBias",
    "all_reduce_counts",
    "apply_capacity",
    "expert_capacity",
]
