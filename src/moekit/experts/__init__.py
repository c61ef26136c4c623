"""Expert weights and computation: a per-token reference, a vectorised CPU path, GPU paths."""

from moekit.experts.backends import BACKENDS, get_backend, resolve_backend
from moekit.experts.module import ExpertsConfig, GroupedExperts, SharedExperts
from moekit.experts.reference import ACTIVATIONS, expert_mlp, experts_reference
from moekit.experts.sorted import SortedAssignments, experts_sorted, sort_assignments

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "ExpertsConfig",
    "GroupedExperts",
    "SharedExperts",
    "SortedAssignments",
    "expert_mlp",
    "experts_reference",
    "experts_sorted",
    "get_backend",
    "resolve_backend",
    "sort_assignments",
]
