"""Missing experts computed on the host by a worker thread.

With ``cpu_compute`` the engine computes some missing experts on the CPU instead of copying
them (Fiddler's idea; :mod:`moekit.offload.costs` decides which). A layer's CPU experts are one
job for a single worker thread (:class:`CpuExperts`): the job starts as soon as the layer's
routing is planned, before the layer's device work is queued, and torch's CPU kernels release
the GIL, so the launching thread queues the copies and the device experts meanwhile. The job
writes each expert's output rows into a host buffer (pinned on CUDA) laid out like the layer's
expert-sorted rows; :meth:`CpuExperts.receive` waits for it on the host and queues the copies
of those rows to the device.

The host still waits for the CPU rows before the layer returns, so the next layer's launches
wait for them too. Letting the device wait instead (the host returns at once and launches the
rest of the model behind a stream wait on a host-written value) was tried in the seventh
session with ``cuStreamWaitValue32`` on a counter in torch's pinned memory: on the H100 virtual
machine a stream waiting on it was not released after the host wrote the value (the probe did
not finish within 30 s), so it is not used (docs/results/offload.md, "Session 7"). The eighth
session's probe (``benchmarks/probe_host_wait.py``) found why: the device reports no stream
memory operations (``CAN_USE_STREAM_MEM_OPS_V1 = 0``); a blocking ``cuLaunchHostFunc`` callback
did not hold the stream either ("Session 8").

One buffer per engine is enough: a job is submitted only after its layer's routing reached the
host, which the device produced after the previous layer's copies out of the buffer.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from moekit.offload.routing_plan import expert_forward

__all__ = ["CpuExperts"]


class CpuExperts:
    """A layer's CPU-computed experts as one job on a worker thread (module doc).

    host_w_in / host_w_out: per layer ``[E, 2F, D]`` / ``[E, D, F]`` host weights. act_fn: the
    experts' activation. device: where the layer's outputs live. on_done: called on the worker
    with ``(seconds, tokens)`` after each expert (the engine's cost model and counters).
    """

    def __init__(self, host_w_in: list[torch.Tensor], host_w_out: list[torch.Tensor], act_fn: Callable,
                 device: torch.device, on_done: Callable[[float, int], None]):
        self.host_w_in, self.host_w_out, self.act_fn = host_w_in, host_w_out, act_fn
        self.device = torch.device(device)
        self.on_done = on_done
        self._pool: ThreadPoolExecutor | None = None
        self._future: Future | None = None
        self._buf: torch.Tensor | None = None  # [rows, D] host rows of the current job (pinned on CUDA)
        self._error: BaseException | None = None

    def submit(self, layer: int, experts: list[int], starts_E1: list[int], tok_N: torch.Tensor,
               x_TD_host: torch.Tensor) -> None:
        """Start computing ``experts`` of ``layer``: expert ``e`` for the tokens
        ``tok_N[starts_E1[e]:starts_E1[e + 1]]`` (a CPU int64 tensor) of ``x_TD_host [T, D]``,
        its outputs into the same rows of the job's buffer."""
        self._raise_error()
        rows = starts_E1[-1]
        buf = self._buf
        if buf is None or buf.shape[0] < rows or buf.shape[1] != x_TD_host.shape[1] or buf.dtype != x_TD_host.dtype:
            buf = torch.empty((max(rows, 64), x_TD_host.shape[1]), dtype=x_TD_host.dtype,
                              pin_memory=self.device.type == "cuda")
            self._buf = buf
        if self._pool is None:
            # the worker's kernels leave one core to the launching thread (OpenMP's thread count is
            # per thread: this does not change the rest of the process)
            threads = max(1, torch.get_num_threads() - 1)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-cpu-experts",
                                            initializer=torch.set_num_threads, initargs=(threads,))
        blocks = [(e, starts_E1[e], starts_E1[e + 1]) for e in experts]
        self._future = self._pool.submit(self._run, layer, blocks, tok_N, x_TD_host, buf)

    def _run(self, layer: int, blocks: list[tuple[int, int, int]], tok_N: torch.Tensor,
             x_TD: torch.Tensor, buf: torch.Tensor) -> None:
        try:
            with torch.no_grad():
                for e, s, t in blocks:
                    t0 = time.perf_counter()
                    buf[s:t].copy_(expert_forward(x_TD[tok_N[s:t]], self.host_w_in[layer][e],
                                                  self.host_w_out[layer][e], self.act_fn))
                    self.on_done(time.perf_counter() - t0, t - s)
        except BaseException as exc:  # reported by the launching thread (drain)
            self._error = exc

    def receive(self, experts: list[int], starts_E1: list[int], y_ND: torch.Tensor, w_N1: torch.Tensor) -> None:
        """Wait for the last job, then queue ``y_ND[rows of e] = cpu_rows(e) * w_N1[rows of e]`` for
        every ``e`` of it (on CUDA: an asynchronous copy from the pinned buffer, behind the queued
        device work)."""
        self.drain()
        for e in experts:
            s, t = starts_E1[e], starts_E1[e + 1]
            torch.mul(self._buf[s:t].to(self.device, non_blocking=True), w_N1[s:t], out=y_ND[s:t])

    def drain(self) -> None:
        """Wait (on the host) for the last job; re-raise its error."""
        if self._future is not None:
            self._future.result()
            self._future = None
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise RuntimeError("computing experts on the CPU failed") from exc

    def close(self) -> None:
        """Finish the last job and stop the worker thread."""
        try:
            self.drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
