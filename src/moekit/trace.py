"""Routing traces: how many token-to-expert assignments each expert got, step by step.

A trace is what a recorder (``moekit.hf.record_routing``) or a serving engine dumps, and what
the placement planner (``moekit.placement``) reads. On disk it is one ``.npz`` file:

- ``counts``: int64 ``[steps, layers, experts]``, assignments of layer ``l``'s tokens to
  expert ``e`` in step ``s`` (each token counts once for each of its ``top_k`` experts);
- ``metadata``: a JSON string (0-d unicode array) with at least ``model``, ``num_experts``,
  ``top_k`` and ``tokens_per_step``; any further JSON-serialisable keys are kept;
- ``domains`` (optional): int64 ``[steps]``, the domain id of each step (e.g. the corpus a
  batch came from), so that per-domain counts can be summed for specialization metrics.

Use :func:`save_trace` (atomic: a temporary file, then ``os.replace``) and :func:`load_trace`
(``ValueError`` on a corrupt file, wrong shapes or negative counts). :func:`synthetic_trace`
makes seeded traces shaped like real recorder dumps for tests and benchmarks.
"""

from __future__ import annotations

import json
import os

import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moekit._io import atomic_path

__all__ = ["RoutingTrace", "save_trace", "load_trace", "synthetic_trace"]

_REQUIRED_META = ("model", "num_experts", "top_k", "tokens_per_step")


@dataclass
class RoutingTrace:
    """Routing counts of one run.

    counts: int64 ``[steps, layers, experts]`` (non-negative).
    metadata: ``model`` (str), ``num_experts`` (int, equal to ``counts.shape[2]``), ``top_k``
        (int), ``tokens_per_step`` (int; tokens routed per step and layer), plus free keys.
    domains: optional int64 ``[steps]`` domain id of each step.
    """

    counts: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    domains: np.ndarray | None = None

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts)
        if counts.ndim != 3:
            raise ValueError(f"counts: expected shape [steps, layers, experts], got {counts.shape}")
        if not np.issubdtype(counts.dtype, np.integer):
            if not np.all(np.isfinite(counts)) or np.any(counts != np.round(counts)):
                raise ValueError("counts: expected integer assignment counts")
        counts = counts.astype(np.int64)
        if counts.size and counts.min() < 0:
            raise ValueError("counts: expected non-negative counts, got a negative value")
        self.counts = counts
        meta = dict(self.metadata)
        meta.setdefault("model", "unknown")
        meta.setdefault("num_experts", int(counts.shape[2]))
        missing = [k for k in _REQUIRED_META if k not in meta]
        if missing:
            raise ValueError(f"metadata: expected keys {list(_REQUIRED_META)}, missing {missing}")
        if int(meta["num_experts"]) != counts.shape[2]:
            raise ValueError(
                f"metadata.num_experts: expected {counts.shape[2]} (counts.shape[2]), "
                f"got {meta['num_experts']}"
            )
        if not 1 <= int(meta["top_k"]) <= counts.shape[2]:
            raise ValueError(f"metadata.top_k: expected 1..{counts.shape[2]}, got {meta['top_k']}")
        self.metadata = meta
        if self.domains is not None:
            dom = np.asarray(self.domains)
            if dom.shape != (counts.shape[0],) or not np.issubdtype(dom.dtype, np.integer):
                raise ValueError(f"domains: expected int [steps={counts.shape[0]}], got {dom.dtype} {dom.shape}")
            if dom.size and dom.min() < 0:
                raise ValueError("domains: expected non-negative domain ids")
            self.domains = dom.astype(np.int64)

    @property
    def num_steps(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.counts.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[2])


def save_trace(path: str | os.PathLike, trace: RoutingTrace) -> None:
    """Write ``trace`` to ``path`` (``.npz``) atomically: nothing half-written on failure."""
    path = os.fspath(path)
    arrays: dict[str, np.ndarray] = {
        "counts": trace.counts,
        "metadata": np.array(json.dumps(trace.metadata, sort_keys=True)),
    }
    if trace.domains is not None:
        arrays["domains"] = trace.domains
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def load_trace(path: str | os.PathLike) -> RoutingTrace:
    """Read a trace written by :func:`save_trace`; ``ValueError`` if it is not a valid one."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"trace: no such file {path!r}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "counts" not in data or "metadata" not in data:
                raise KeyError("expected arrays 'counts' and 'metadata'")
            counts = data["counts"]
            meta = json.loads(str(data["metadata"][()]))
            domains = data["domains"] if "domains" in data else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as exc:
        # np.load raises ValueError for non-npz bytes and JSONDecodeError is a ValueError too.
        raise ValueError(f"trace {path!r}: not a valid routing trace .npz ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"trace {path!r}: metadata is not a JSON object")
    try:
        return RoutingTrace(counts=counts, metadata=meta, domains=domains)
    except ValueError as exc:
        raise ValueError(f"trace {path!r}: {exc}") from exc


def synthetic_trace(
    num_steps: int,
    num_layers: int,
    num_experts: int,
    top_k: int,
    tokens_per_step: int,
    *,
    popularity: str = "zipf",
    skew: float = 1.0,
    drift: float = 0.05,
    step_noise: float = 0.3,
    burst_prob: float = 0.02,
    burst_scale: float = 4.0,
    seed: int = 0,
) -> RoutingTrace:
    """A seeded trace shaped like a real recorder dump.

    Per layer, a skewed base popularity over experts (``"zipf"``: ``p_e ~ rank^-s`` over a random
    expert order with ``s ~ U(0.3, 0.7) * skew``; ``"lognormal"``: ``log p_e ~ N(0, skew)``)
    that drifts slowly (a random walk of the log-popularity with std ``drift`` per step), plus
    per-step batch-composition noise (``step_noise``, std of the log-popularity) and bursts (each
    step and layer, with probability ``burst_prob`` one random expert gets ``burst_scale`` times
    its popularity for 1-8 steps).

    Counts of a step are ``Multinomial(top_k * tokens_per_step, p)`` with ``p`` capped at
    ``1 / top_k`` (no expert can get more than every token): this matches the marginal counts of
    top-k routing, not the exact joint law of distinct experts per token.

    Returns a :class:`RoutingTrace` with counts int64 ``[num_steps, num_layers, num_experts]``.
    """
    for name, val in (("num_steps", num_steps), ("num_layers", num_layers),
                      ("num_experts", num_experts), ("tokens_per_step", tokens_per_step)):
        if int(val) < 1:
            raise ValueError(f"{name}: expected a positive integer, got {val}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected 1 <= top_k <= num_experts={num_experts}, got {top_k}")
    if popularity not in ("zipf", "lognormal"):
        raise ValueError(f"popularity: expected 'zipf' or 'lognormal', got {popularity!r}")
    for name, val in (("skew", skew), ("drift", drift), ("step_noise", step_noise),
                      ("burst_scale", burst_scale)):
        if not np.isfinite(val) or val < 0:
            raise ValueError(f"{name}: expected a finite value >= 0, got {val}")
    if not 0.0 <= burst_prob <= 1.0:
        raise ValueError(f"burst_prob: expected a probability in [0, 1], got {burst_prob}")

    rng = np.random.default_rng(seed)
    if popularity == "zipf":
        s_L1 = rng.uniform(0.3, 0.7, size=(num_layers, 1)) * skew
        ranks_LE = np.argsort(rng.random((num_layers, num_experts)), axis=1) + 1.0
        base_LE = -s_L1 * np.log(ranks_LE)
    else:
        base_LE = rng.normal(0.0, skew, size=(num_layers, num_experts))
    walk_LE = np.zeros((num_layers, num_experts))
    burst_left_LE = np.zeros((num_layers, num_experts), dtype=np.int64)
    counts = np.empty((num_steps, num_layers, num_experts), dtype=np.int64)
    n_draws = top_k * tokens_per_step
    for step in range(num_steps):
        walk_LE += rng.normal(0.0, drift, size=walk_LE.shape)
        start_L = rng.random(num_layers) < burst_prob
        if start_L.any():
            rows = np.flatnonzero(start_L)
            burst_left_LE[rows, rng.integers(0, num_experts, size=rows.size)] = rng.integers(1, 9, rows.size)
        logits_LE = base_LE + walk_LE + rng.normal(0.0, step_noise, size=walk_LE.shape)
        logits_LE = logits_LE + np.log(burst_scale) * (burst_left_LE > 0) if burst_scale > 0 else logits_LE
        burst_left_LE = np.maximum(burst_left_LE - 1, 0)
        p_LE = np.exp(logits_LE - logits_LE.max(axis=1, keepdims=True))
        p_LE = _cap_probabilities(p_LE / p_LE.sum(axis=1, keepdims=True), 1.0 / top_k)
        counts[step] = rng.multinomial(n_draws, p_LE)
    meta = {
        "model": f"synthetic-{popularity}",
        "num_experts": num_experts,
        "top_k": top_k,
        "tokens_per_step": tokens_per_step,
        "generator": {"popularity": popularity, "skew": skew, "drift": drift,
                      "step_noise": step_noise, "burst_prob": burst_prob,
                      "burst_scale": burst_scale, "seed": seed},
    }
    return RoutingTrace(counts=counts, metadata=meta)


def _cap_probabilities(p_LE: np.ndarray, cap: float) -> np.ndarray:
    """Clip each row of ``p_LE`` at ``cap`` and give the excess to the other experts pro rata."""
    for _ in range(p_LE.shape[1]):
        over = p_LE > cap
        if not over.any():
            break
        excess_L1 = np.where(over, p_LE - cap, 0.0).sum(axis=1, keepdims=True)
        free_LE = np.where(over, 0.0, p_LE)
        p_LE = np.where(over, cap, p_LE + excess_L1 * free_LE / np.maximum(free_LE.sum(axis=1, keepdims=True), 1e-300))
    return p_LE / p_LE.sum(axis=1, keepdims=True)
