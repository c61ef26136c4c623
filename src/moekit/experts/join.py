"""One weight gradient for several expert calls on the same weights, without an add pass.

The overlap modes of :mod:`moekit.parallel.overlap` run the local experts twice per forward
on the same ``[S, H, D]`` / ``[S, D, F]`` weights: once on this rank's own rows (side stream),
once on the rows received from other ranks. Left to autograd, each call's backward writes a
full weight gradient and the engine adds the two (one more read of both and one write: 0.47 ms
per OLMoE-like step on an H100, about 1.4 ms on the DeepSeek-V3 slice).

A :class:`WeightGradJoin` made per forward and handed to both calls
(``experts_grouped_mm(..., join=join)``) lets the calls share one gradient buffer instead: the
first call's backward to run (whichever autograd picks) writes its weight gradient into a new
tensor, keeps it here and gives autograd ``None`` for the weights; every later call's
weight-gradient GEMMs *accumulate* into that tensor (fp32 in the epilogue, one rounding:
:func:`moekit.experts.triton_gmm.gmm_k_grouped` ``accumulate=True``), and the last one returns
it. The join only holds state; the grouped backward (:mod:`moekit.experts.grouped`) does the
arithmetic.

Streams: autograd runs each call's backward on the stream of its forward, so the calls may
write on different CUDA streams. The first records an event after its writes; a later call
makes its stream wait for that event right before its accumulating GEMMs (its input-gradient
GEMMs run before, beside the other call's work) and marks the buffer as used on its stream.

Contract: every call registered with a join must take part in the backward pass (its output
reaches the loss, as both do in the overlap, where they are summed). A registered call whose
backward never runs would leave the others' gradient here; that is caught at the end of the
backward pass (``RuntimeError``) instead of dropping the gradient silently. After the last
call the join resets, so a graph kept with ``retain_graph=True`` can be differentiated again.
"""

from __future__ import annotations

import torch

__all__ = ["WeightGradJoin"]


class WeightGradJoin:
    """Shared by the expert calls of one forward on the same weights (module docstring).

    Use: ``register`` once per call in its forward (with the weights it reads), then in each
    call's backward ``into()`` right before the weight-gradient GEMMs (``None``: write new
    tensors; else the ``(dw_in, dw_out)`` buffers to accumulate into) and ``deliver(dw_in,
    dw_out)`` after them (what to give autograd for the two weights: ``(None, None)`` but for
    the last call)."""

    def __init__(self) -> None:
        self._calls = 0
        self._pending = 0
        self._meta: tuple | None = None  # (shape, dtype, device) of each weight of the first call
        self._grads: tuple[torch.Tensor, torch.Tensor] | None = None
        self._written = None  # CUDA event after the buffers' last writes
        self._check_queued = False

    @property
    def calls(self) -> int:
        """Calls registered so far."""
        return self._calls

    def register(self, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        """A call's forward: it will contribute the gradients of ``w_in`` and ``w_out``, which
        must have the shapes, dtype and device of every other call's weights."""
        meta = tuple((tuple(w.shape), w.dtype, w.device) for w in (w_in, w_out))
        if self._meta is not None and meta != self._meta:
            raise ValueError(f"join: expected every call to read weights of {self._meta}, got {meta}")
        if self._pending != self._calls:
            raise ValueError("join: a call registered while a backward pass through the join is under way")
        self._meta = meta
        self._calls += 1
        self._pending += 1

    def into(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """In a call's backward, before its weight-gradient GEMMs: the buffers to accumulate
        into (the current CUDA stream made to wait for their last writes), or ``None`` if no
        call has written yet (write new tensors)."""
        self._queue_completeness_check()
        return self._on_current_stream()

    def _on_current_stream(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The buffers (or ``None``), the current CUDA stream made to wait for their last writes."""
        if self._grads is not None and self._written is not None:
            stream = torch.cuda.current_stream(self._grads[0].device)
            stream.wait_event(self._written)
            for g in self._grads:  # written on another stream: keep its memory until this one is done
                g.record_stream(stream)
        return self._grads

    def deliver(self, dw_in: torch.Tensor | None, dw_out: torch.Tensor | None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """After a call's weight-gradient GEMMs (``None``: it had no gradient to add):
        ``(None, None)`` while other calls are still to come, else the joined gradients
        (the join is then reset for another backward pass of the same graph)."""
        if self._pending <= 0:
            raise RuntimeError("join: more backward calls than registered calls")
        self._queue_completeness_check()
        if (dw_in is None) != (dw_out is None):
            raise ValueError("dw_in, dw_out: expected both gradients or neither")
        if dw_in is not None:
            if self._grads is not None and (dw_in is not self._grads[0] or dw_out is not self._grads[1]):
                raise ValueError("dw_in, dw_out: expected the buffers given by into()")
            self._grads = (dw_in, dw_out)
            if dw_in.device.type == "cuda":
                self._written = torch.cuda.Event()
                self._written.record(torch.cuda.current_stream(dw_in.device))
        self._pending -= 1
        if self._pending:
            return None, None
        # autograd takes what a backward returns as made on its stream: the last call may have
        # had nothing to add (no gradient), so its stream waits for the writes explicitly
        grads = self._on_current_stream() or (None, None)
        self._grads, self._written, self._pending = None, None, self._calls
        return grads

    def _queue_completeness_check(self) -> None:
        """At the first backward call of a pass: check at the end of the pass that every
        registered call delivered (autograd's end-of-pass callback; only inside a backward)."""
        if self._check_queued or self._pending != self._calls or torch._C._current_graph_task_id() < 0:
            return
        self._check_queued = True

        def check() -> None:
            self._check_queued = False
            if self._pending != self._calls:
                missing = self._pending
                self._grads, self._written, self._pending = None, None, self._calls
                raise RuntimeError(f"join: {missing} of {self._calls} registered expert calls got no backward in "
                                   f"this pass: their joined weight gradient would be lost (every call given a "
                                   f"join must reach the loss)")

        torch.autograd.Variable._execution_engine.queue_callback(check)
