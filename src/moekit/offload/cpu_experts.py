"""Missing experts computed on the host while the launching thread goes on.

With ``cpu_compute`` the engine computes some missing experts on the CPU instead of copying
them (Fiddler's idea; :mod:`moekit.offload.costs` decides which). Computed on the thread that
also launches the model's kernels, the host spends that time (about 7 ms per Mixtral-8x7B
expert) not launching anything: the device finishes what is queued, the copy engine finishes
its copies, and both idle while the host computes and then launches the rest of the layer and
the next layer's attention (the s6 run measured the copy engine busy only 68-76 % of a batch-8
step). Here a layer's CPU experts are one job for a single worker thread (:class:`CpuExperts`;
torch's CPU kernels release the GIL, so the launching thread runs meanwhile), and the job writes
each expert's output rows into a host buffer laid out like the layer's expert-sorted rows.

How the device learns that the rows are there without the host waiting: a 32-bit counter in
pinned host memory (:class:`HostFlag`). The job stores its ticket there when its rows are
written; the layer queues on the compute stream a wait until the counter reaches the ticket
(``cuStreamWaitValue32``, a CUDA driver stream memory operation that PyTorch does not wrap;
called through ``ctypes``), then the copies of the rows to the device. The host returns from the
layer at once and launches the rest of the model behind that wait, and the next layer's routing
(which the host reads) arrives once the CPU rows are in. When the driver call is not available
(or on a CPU "device") the layer waits for the job on the host instead, after queueing its
device work (:meth:`CpuExperts.receive`), which still overlaps the CPU experts with those
launches.

One buffer per engine is enough: a job is submitted only after its layer's routing reached the
host, which the device produced after the previous layer's copies out of the buffer.
"""

from __future__ import annotations

import ctypes
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["HostFlag", "CpuExperts", "expert_forward"]


def expert_forward(x_ND: torch.Tensor, w_in_HD: torch.Tensor, w_out_DF: torch.Tensor, act_fn: Callable) -> torch.Tensor:
    """One SwiGLU expert ``[N, D] -> [N, D]`` (``w_in_HD [2F, D]`` = gate rows then up rows,
    ``w_out_DF [D, F]``), as ``transformers``' eager expert computes it."""
    gate_NF, up_NF = F.linear(x_ND, w_in_HD).chunk(2, dim=-1)
    return F.linear(act_fn(gate_NF) * up_NF, w_out_DF)


class HostFlag:
    """A 32-bit counter in pinned host memory that a CUDA stream can wait on.

    :meth:`wait` queues on a stream "wait until ``(int32)(counter - ticket) >= 0``" (the driver's
    default cyclic greater-or-equal); :meth:`set` stores a ticket from any host thread. Build it
    with :meth:`create`, which returns None where the driver call is unavailable.
    """

    _GEQ = 0  # CU_STREAM_WAIT_VALUE_GEQ

    def __init__(self, host: torch.Tensor, device_ptr: int, wait_fn):
        self.host = host  # [1] int32, pinned
        self._view = host.numpy().view("uint32")
        self.device_ptr = device_ptr
        self._wait_fn = wait_fn

    @classmethod
    def create(cls, device: torch.device) -> HostFlag | None:
        """A flag usable by ``device``'s streams, or None (no CUDA device, no driver library, no
        stream memory operations, or pinned memory without a device mapping)."""
        if torch.device(device).type != "cuda":
            return None
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            wait_fn = getattr(lib, "cuStreamWaitValue32_v2", None) or lib.cuStreamWaitValue32
            get_ptr = getattr(lib, "cuMemHostGetDevicePointer_v2", None) or lib.cuMemHostGetDevicePointer
        except (OSError, AttributeError):
            return None
        wait_fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        wait_fn.restype = ctypes.c_int
        get_ptr.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
        get_ptr.restype = ctypes.c_int
        with torch.cuda.device(device):
            host = torch.zeros(1, dtype=torch.int32, pin_memory=True)
            ptr = ctypes.c_uint64(0)
            if get_ptr(ctypes.byref(ptr), ctypes.c_void_p(host.data_ptr()), 0) != 0:
                return None
            flag = cls(host, ptr.value, wait_fn)
            probe = torch.cuda.Stream(device)  # a wait that is already satisfied: is the call accepted?
            if flag._wait_fn(ctypes.c_void_p(probe.cuda_stream), ctypes.c_uint64(ptr.value), 0, cls._GEQ) != 0:
                return None
            probe.synchronize()
        return flag

    def wait(self, stream: torch.cuda.Stream, ticket: int) -> None:
        """Work queued on ``stream`` after this starts once the counter has reached ``ticket``."""
        rc = self._wait_fn(ctypes.c_void_p(stream.cuda_stream), ctypes.c_uint64(self.device_ptr),
                           ctypes.c_uint32(ticket & 0xFFFFFFFF), self._GEQ)
        if rc != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed with CUDA driver error {rc}")

    def set(self, ticket: int) -> None:
        """Store ``ticket`` (after everything the waiting work reads has been written)."""
        self._view[0] = ticket & 0xFFFFFFFF

    @property
    def value(self) -> int:
        return int(self._view[0])


class CpuExperts:
    """A layer's CPU-computed experts as one job on a worker thread (module doc).

    host_w_in / host_w_out: per layer ``[E, 2F, D]`` / ``[E, D, F]`` host weights. act_fn: the
    experts' activation. device: where the layer's outputs live. on_done: called on the worker
    with ``(seconds, tokens)`` after each expert, before the job's rows are announced (the
    engine's cost model and counters). overlap: use a :class:`HostFlag` when the device offers
    one (else, and on a CPU device, :meth:`receive` waits on the host).
    """

    def __init__(self, host_w_in: list[torch.Tensor], host_w_out: list[torch.Tensor], act_fn: Callable,
                 device: torch.device, on_done: Callable[[float, int], None], overlap: bool = True):
        self.host_w_in, self.host_w_out, self.act_fn = host_w_in, host_w_out, act_fn
        self.device = torch.device(device)
        self.on_done = on_done
        self.flag = HostFlag.create(self.device) if overlap else None
        self._pool: ThreadPoolExecutor | None = None
        self._future: Future | None = None
        self._ticket = 0
        self._buf: torch.Tensor | None = None  # [rows, D] host rows of the current job (pinned on CUDA)
        self._error: BaseException | None = None

    @property
    def overlapped(self) -> bool:
        """Whether the device waits for the CPU rows itself (the host does not wait)."""
        return self.flag is not None

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
        self._ticket += 1
        if self._pool is None:
            # the worker's kernels leave one core to the launching thread (OpenMP's thread count is
            # per thread: this does not change the rest of the process)
            threads = max(1, torch.get_num_threads() - 1)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-cpu-experts",
                                            initializer=torch.set_num_threads, initargs=(threads,))
        blocks = [(e, starts_E1[e], starts_E1[e + 1]) for e in experts]
        self._future = self._pool.submit(self._run, self._ticket, layer, blocks, tok_N, x_TD_host, buf)

    def _run(self, ticket: int, layer: int, blocks: list[tuple[int, int, int]], tok_N: torch.Tensor,
             x_TD: torch.Tensor, buf: torch.Tensor) -> None:
        try:
            with torch.no_grad():
                for e, s, t in blocks:
                    t0 = time.perf_counter()
                    buf[s:t].copy_(expert_forward(x_TD[tok_N[s:t]], self.host_w_in[layer][e],
                                                  self.host_w_out[layer][e], self.act_fn))
                    self.on_done(time.perf_counter() - t0, t - s)
        except BaseException as exc:  # reported by the launching thread; the device must not wait forever
            self._error = exc
        finally:
            if self.flag is not None:
                self.flag.set(ticket)

    def receive(self, experts: list[int], starts_E1: list[int], y_ND: torch.Tensor, w_N1: torch.Tensor):
        """Queue ``y_ND[rows of e] = cpu_rows(e) * w_N1[rows of e]`` for every ``e`` of the last job.
        Overlapped: behind a device-side wait for the job (returns the CUDA events before and after
        that wait, for the time the device waited); otherwise waits for the job here first
        (returns None)."""
        events = None
        if self.flag is not None:
            stream = torch.cuda.current_stream(self.device)
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record(stream)
            self.flag.wait(stream, self._ticket)
            after.record(stream)
            events = (before, after)
        else:
            self.drain()
        for e in experts:
            s, t = starts_E1[e], starts_E1[e + 1]
            torch.mul(self._buf[s:t].to(self.device, non_blocking=True), w_N1[s:t], out=y_ND[s:t])
        return events

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
