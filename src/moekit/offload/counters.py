"""The raw counters of an offload engine (:class:`OffloadCounters`), behind ``handle.stats()``."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["OffloadCounters"]


@dataclass
class OffloadCounters:
    """Raw counts behind ``handle.stats()`` (see :mod:`moekit.offload.api` for the figures).

    activations: (layer call, expert) pairs needed by at least one token. hits: those whose
    weights were already on the device when the layer needed them (in a slot, every chunk
    issued and every copy finished: DESIGN.md's hit). inflight_hits: those whose every chunk
    was issued but still being copied at that moment (a late prefetch: neither a hit nor a
    miss copied from scratch; the computation waits for the rest, counted in stall_s).
    Misses = activations - hits - inflight_hits. cpu_computed: misses computed on the CPU.
    demand_copies: misses whose (missing) chunks were copied on demand (a prefetch dropped
    part-way is a miss: only its missing chunks are copied); prefetch_copies: experts a
    prefetch started to copy; prefetch_useful: prefetched experts that were hits of the layer
    they were fetched for (landed in time); prefetch_evicted_early: prefetched experts evicted
    (their slot given to another expert) before the layer they were fetched for ran.
    With staging slots (:mod:`moekit.offload.staging`): staged_hits / staged_inflight_hits /
    staged_misses: activations served from a staging slot, landed / fully issued but still
    copying / only partly issued (the rest copied on demand; a miss); of the staged hits,
    victim_hits were not a guess's first use (mostly experts a promotion had evicted from the
    cache and the staging area kept), so prefetch_useful = staged_hits - victim_hits;
    staged_dropped: guesses overwritten in staging before any layer used them (wrong guesses:
    none of them evicted a cached expert).
    predicted / predicted_used: |P| and |P & A| summed over layer calls (P predicted top-k set,
    A needed set); needed_after_prediction: |A| over the same layer calls. prefetch_lead_s /
    prefetch_leads: host seconds from a layer's prefetch being queued to its routing being
    known, summed over the layer calls that had one, and their number (how early a prefetch
    starts: an expert copy must fit in that time to land as a hit). h2d_bytes (of which
    prefetch_bytes): bytes copied to the device. stall_s: time the computation waited for
    copies. host_wait_s: time the host waited for a layer's counts. cpu_busy_s: time the
    host (the CPU worker thread, :mod:`moekit.offload.cpu_experts`) spent computing experts.
    tokens: tokens through the
    first MoE layer. wall_s: wall time of the model's forward passes.
    """

    activations: int = 0
    hits: int = 0
    inflight_hits: int = 0
    cpu_computed: int = 0
    demand_copies: int = 0
    prefetch_copies: int = 0
    prefetch_useful: int = 0
    prefetch_evicted_early: int = 0
    staged_hits: int = 0
    staged_inflight_hits: int = 0
    staged_misses: int = 0
    staged_dropped: int = 0
    victim_hits: int = 0
    predicted: int = 0
    predicted_used: int = 0
    needed_after_prediction: int = 0
    prefetch_lead_s: float = 0.0
    prefetch_leads: int = 0
    h2d_bytes: int = 0
    prefetch_bytes: int = 0
    stall_s: float = 0.0
    host_wait_s: float = 0.0
    cpu_busy_s: float = 0.0
    tokens: int = 0
    wall_s: float = 0.0
    layer_calls: int = 0
    pending_waits: list = field(default_factory=list)  # CUDA (marker, ready) event pairs
