"""Host-to-device expert copies in row chunks on one copy stream, with per-slot progress.

An expert's weights (``w_in [2F, D]`` and ``w_out [D, F]``, contiguous rows of pinned host
tensors) are copied as row chunks of about ``chunk_bytes`` each. Chunks exist for prefetch:
a prefetch is issued a few chunks at a time, only while the copy stream has fewer than a
handful of chunks queued (:meth:`ChunkedCopier.queued`), so when a layer's real routing shows
a guess was wrong the rest of that guess is simply never issued, and the layer's demand copies
wait behind at most the chunks already queued instead of a whole mispredicted expert (CUDA
runs the copies of one stream in order; nothing queued can be taken back). A slot whose
prefetch was dropped part-way keeps its progress: if that expert is needed later only the
missing chunks are copied.

Whether a slot's copies have *landed* (finished, not only issued) is asked without waiting
(:meth:`ChunkedCopier.landed`): that is what separates a cache hit from a late prefetch.

Slot reuse is safe across streams: the first chunk copied into a slot waits for the event
recorded after the last computation that read the slot. Every chunk is bracketed by timing
events, so the copy engine's busy time (:meth:`resolve`) can be set against the wall time.
On a CPU "device" (tests) copies are synchronous; their time is ``sync_copy_s``.
"""

from __future__ import annotations

import time
from collections import deque

import torch

__all__ = ["ChunkedCopier", "chunk_rows"]


def chunk_rows(rows: int, row_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` row ranges covering ``rows`` rows of ``row_bytes`` bytes in
    near-equal chunks of at most ``max(chunk_bytes, row_bytes)`` bytes."""
    if rows < 1 or row_bytes < 1 or chunk_bytes < 1:
        raise ValueError(f"rows / row_bytes / chunk_bytes: expected positive integers, got {rows}, {row_bytes}, {chunk_bytes}")
    n = max(1, -(-rows * row_bytes // chunk_bytes))
    n = min(n, rows)
    bounds = [rows * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _merge_rows(chunks: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Consecutive ``(tensor, start, end, bytes)`` chunks of the same tensor joined into one."""
    out: list[tuple[int, int, int, int]] = []
    for which, a, b, size in chunks:
        if out and out[-1][0] == which and out[-1][2] == a:
            out[-1] = (which, out[-1][1], b, out[-1][3] + size)
        else:
            out.append((which, a, b, size))
    return out


class ChunkedCopier:
    """Copies experts of pinned host weights into device slots, chunk by chunk.

    host_w_in / host_w_out: per layer ``[E, 2F, D]`` / ``[E, D, F]``. slot_in / slot_out:
    device ``[S, 2F, D]`` / ``[S, D, F]``. chunk_bytes: target size of one chunk (bytes).
    ``progress[slot]`` is the number of chunks of the slot's current expert already issued.
    """

    def __init__(self, host_w_in: list[torch.Tensor], host_w_out: list[torch.Tensor], slot_in: torch.Tensor,
                 slot_out: torch.Tensor, device: torch.device, chunk_bytes: int):
        self.host_w_in, self.host_w_out = host_w_in, host_w_out
        self.slot_in, self.slot_out = slot_in, slot_out
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.chunk_bytes = int(chunk_bytes)
        w_in, w_out = host_w_in[0][0], host_w_out[0][0]
        row_in, row_out = w_in[0].numel() * w_in.element_size(), w_out[0].numel() * w_out.element_size()
        self.chunks = ([(0, a, b, (b - a) * row_in) for a, b in chunk_rows(w_in.shape[0], row_in, chunk_bytes)]
                       + [(1, a, b, (b - a) * row_out) for a, b in chunk_rows(w_out.shape[0], row_out, chunk_bytes)])
        self.progress: dict[int, int] = {}
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ready: dict[int, torch.cuda.Event] = {}  # slot -> after its last issued chunk
        self._free: dict[int, torch.cuda.Event] = {}  # slot -> after the last computation reading it
        self._ends: deque = deque()  # end events of chunks maybe still running (queue depth)
        self._timed: list = []  # (start, end) event pairs not yet turned into busy seconds
        self.busy_s = 0.0
        self.sync_copy_s = 0.0
        self.chunks_issued = 0

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def assign(self, slot: int) -> None:
        """The slot now holds a new expert: no chunk of it is there yet."""
        self.progress[slot] = 0

    def complete(self, slot: int) -> bool:
        """Whether every chunk of the slot's expert has been issued."""
        return self.progress.get(slot, 0) >= len(self.chunks)

    def missing_bytes(self, slot: int) -> int:
        return sum(c[3] for c in self.chunks[self.progress.get(slot, 0):])

    def issue(self, key: tuple[int, int], slot: int, max_chunks: int | None = None, merged: bool = False) -> int:
        """Issue up to ``max_chunks`` (all remaining when None) chunks of expert ``key`` into
        ``slot``; returns the bytes issued. ``merged``: the chunks of each weight tensor go as
        one copy, timed as one (they still count one by one in :meth:`queued`, until the copy
        ends): the same bytes with a fifth of the host calls, for copies nothing needs to
        interleave with (demand copies without prefetch)."""
        layer, expert = key
        done = self.progress.get(slot, 0)
        stop = len(self.chunks) if max_chunks is None else min(len(self.chunks), done + max_chunks)
        if stop <= done:
            return 0
        src = (self.host_w_in[layer][expert], self.host_w_out[layer][expert])
        dst = (self.slot_in[slot], self.slot_out[slot])
        pieces = _merge_rows(self.chunks[done:stop]) if merged else self.chunks[done:stop]
        nbytes = sum(size for *_, size in pieces)
        if self.cuda:
            with torch.cuda.stream(self.stream):
                if slot in self._free:  # do not overwrite weights a queued computation still reads
                    self.stream.wait_event(self._free.pop(slot))
                start = end = None
                for which, a, b, _ in pieces:
                    if start is None or not merged:
                        start = torch.cuda.Event(enable_timing=True)
                        start.record(self.stream)
                    dst[which][a:b].copy_(src[which][a:b], non_blocking=True)
                    if not merged:
                        end = torch.cuda.Event(enable_timing=True)
                        end.record(self.stream)
                        self._ends.append(end)
                        self._timed.append((start, end))
                if merged:
                    end = torch.cuda.Event(enable_timing=True)
                    end.record(self.stream)
                    self._ends.extend([end] * (stop - done))
                    self._timed.append((start, end))
            self._ready[slot] = end
        else:
            t0 = time.perf_counter()
            for which, a, b, _ in pieces:
                dst[which][a:b].copy_(src[which][a:b])
            self.sync_copy_s += time.perf_counter() - t0
        self.chunks_issued += stop - done
        self.progress[slot] = stop
        return nbytes

    def landed(self, slot: int) -> bool:
        """Whether every chunk issued into ``slot`` has finished copying, without waiting
        (``Event.query``): the weights issued so far are on the device. Always True on a CPU
        device, where copies are synchronous. (Issued is not all: see :meth:`complete`.)"""
        ready = self._ready.get(slot)
        return ready is None or ready.query()

    def queued(self) -> int:
        """Chunks issued and not finished yet (0 on a CPU device, where copies are synchronous)."""
        while self._ends and self._ends[0].query():
            self._ends.popleft()
        return len(self._ends)

    def take_ready(self, slot: int) -> torch.cuda.Event | None:
        """The event after the slot's last issued chunk (None if nothing is pending on it)."""
        return self._ready.pop(slot, None)

    def mark_read(self, slot: int) -> None:
        """Record that the current stream's queued work reads ``slot`` up to here."""
        if self.cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._free[slot] = done

    def resolve(self) -> None:
        """Add the finished chunks' copy time to ``busy_s`` (synchronises the copy stream)."""
        if not self._timed:
            return
        self.stream.synchronize()
        self.busy_s += sum(s.elapsed_time(e) for s, e in self._timed) / 1e3
        self._timed.clear()
        self._ends.clear()
