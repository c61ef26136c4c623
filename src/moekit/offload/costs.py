"""Measured costs that drive offloading decisions: host-to-device bandwidth and CPU expert speed.

Fiddler's observation: when an expert is missing from the GPU, computing it on the CPU for the
few tokens that need it can be faster than copying its weights. moekit decides per missing
expert with measured numbers of the same machine:

- ``copy_s = expert_bytes / h2d_bytes_per_s`` (pinned host-to-device bandwidth, measured);
- ``cpu_s(n) = cpu_s_fixed + n * cpu_s_per_token`` (an expert's SwiGLU MLP timed on the CPU
  for 1 and for 32 tokens, in the weights' dtype);

and, going through a layer's misses in order, sends each to the queue that finishes it first (list
scheduling): the CPU when ``cpu_backlog_s + cpu_s(n) < backlog_s + copy_s``, where the backlogs
are the work this layer already gave the CPU and the copy engine. (Comparing one expert's times
alone sent every miss to the CPU once the CPU was the faster of the two.)
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

__all__ = ["TransferCosts", "parse_bytes", "measure_h2d_bandwidth", "measure_cpu_expert"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str, name: str = "gpu_memory") -> int:
    """Bytes from an int or a string like ``"8GB"``, ``"7.5GiB"``, ``"512MiB"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"{name}: expected a positive number of bytes, got {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{name}: expected bytes like '8GB', '7.5GiB' or an integer, got {value!r}")
    nbytes = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if nbytes <= 0:
        raise ValueError(f"{name}: expected a positive size, got {value!r}")
    return nbytes


@dataclass
class TransferCosts:
    """Measured cost model of one machine for one expert size (see module doc).

    h2d_bytes_per_s: pinned host-to-device bandwidth (bytes/s). expert_bytes: bytes of one
    expert's weights. cpu_s_fixed / cpu_s_per_token: CPU time of one expert's MLP,
    ``cpu_s_fixed + n * cpu_s_per_token`` seconds for ``n`` tokens. cpu_adapt: weight of each
    CPU expert time observed while decoding in a moving average of ``cpu_s_fixed``
    (:meth:`observe_cpu`; 0 keeps the measured model fixed).
    """

    h2d_bytes_per_s: float
    expert_bytes: int
    cpu_s_fixed: float
    cpu_s_per_token: float
    cpu_adapt: float = 0.0

    def copy_s(self) -> float:
        """Seconds to copy one expert to the device."""
        return self.expert_bytes / self.h2d_bytes_per_s

    def cpu_s(self, num_tokens: int) -> float:
        """Seconds to compute one expert on the CPU for ``num_tokens`` tokens."""
        return self.cpu_s_fixed + num_tokens * self.cpu_s_per_token

    def observe_cpu(self, seconds: float, num_tokens: int) -> None:
        """Fold one CPU expert's measured ``seconds`` for ``num_tokens`` tokens into
        ``cpu_s_fixed`` (moving average, weight ``cpu_adapt``; the per-token slope is kept).
        The figure measured once at ``offload`` time sees an idle host; while decoding the CPU
        shares host memory with the copies, and one H100 run found the experts taking longer
        than measured, so the list scheduling sent the CPU more misses than it could finish
        before the copies."""
        if self.cpu_adapt > 0:
            fixed = max(seconds - num_tokens * self.cpu_s_per_token, 0.0)
            self.cpu_s_fixed += self.cpu_adapt * (fixed - self.cpu_s_fixed)

    def prefer_cpu(self, num_tokens: int, backlog_s: float, cpu_backlog_s: float = 0.0) -> bool:
        """Whether a missing expert finishes sooner on the CPU than through a copy, when the
        copies already queued take ``backlog_s`` seconds and the CPU work already planned
        ``cpu_backlog_s`` seconds."""
        return cpu_backlog_s + self.cpu_s(num_tokens) < backlog_s + self.copy_s()


def measure_h2d_bandwidth(device: torch.device, nbytes: int = 64 * 2**20, repeats: int = 5) -> float:
    """Pinned host-to-device bandwidth in bytes/s (best of ``repeats`` copies of ``nbytes``).
    On a CPU "device" this is the host memcpy bandwidth (what a copy to a CPU slot costs)."""
    device = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8)
    if device.type == "cuda":
        src = src.pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for i in range(repeats + 1):  # the first copy warms up the path and is not counted
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        if i > 0:
            best = min(best, seconds)
    return nbytes / max(best, 1e-9)


def measure_cpu_expert(w_in_HD: torch.Tensor, w_out_DF: torch.Tensor, repeats: int = 3) -> tuple[float, float]:
    """``(cpu_s_fixed, cpu_s_per_token)``: time of one SwiGLU expert on the CPU with these
    (CPU) weights, fitted through the best times at 1 and 32 tokens (below some tens of
    tokens a bf16 expert is memory-bound on the CPU and the slope hides in the noise)."""
    from moekit.experts.reference import expert_mlp

    dim = w_in_HD.shape[1]
    times = {}
    with torch.no_grad():
        for n in (1, 32):
            x_ND = torch.randn(n, dim, dtype=w_in_HD.dtype)
            expert_mlp(x_ND, w_in_HD, w_out_DF, "swiglu")  # warm-up
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                expert_mlp(x_ND, w_in_HD, w_out_DF, "swiglu")
                best = min(best, time.perf_counter() - t0)
            times[n] = best
    per_token = max(times[32] - times[1], 0.0) / 31
    return max(times[1] - per_token, 0.0), per_token
