"""Offloaded MoE inference: CPU-resident experts, a GPU expert cache, chunked copies, prefetch of
the next layers' predicted experts (optionally into staging slots outside the cache), CPU
computation of missing experts, CUDA graphs of the dense parts of decode steps, and the figures
of DESIGN.md ("Offload figures")."""

from moekit.offload.api import PREFETCH, OffloadedExperts, OffloadHandle, offload
from moekit.offload.cache import POLICIES, ExpertCache
from moekit.offload.copies import ChunkedCopier
from moekit.offload.costs import (
    TransferCosts,
    measure_cpu_expert,
    measure_h2d_bandwidth,
    parse_bytes,
)
from moekit.offload.engine import OffloadCounters, OffloadEngine
from moekit.offload.graphs import DecodeGraphs, graph_decode
from moekit.offload.staging import StagingArea

__all__ = [
    "offload",
    "graph_decode",
    "DecodeGraphs",
    "OffloadHandle",
    "OffloadedExperts",
    "OffloadEngine",
    "OffloadCounters",
    "ExpertCache",
    "StagingArea",
    "ChunkedCopier",
    "POLICIES",
    "PREFETCH",
    "TransferCosts",
    "parse_bytes",
    "measure_h2d_bandwidth",
    "measure_cpu_expert",
]
