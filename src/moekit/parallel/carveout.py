"""Leave some streaming multiprocessors (SMs) to the all-to-alls while expert GEMMs run.

The grouped GEMMs of the expert backend (``torch._grouped_mm``: a persistent CUTLASS kernel
on Hopper) launch one block per SM and keep every SM until the whole GEMM is done. An NCCL
kernel queued beside one (the exchange of :mod:`moekit.parallel.overlap`, which runs while
the own tokens' experts compute) then cannot start until the GEMM ends, and when the NCCL
kernel got its SMs first, the GEMM's last blocks wait for them instead (a second wave). The
fourth device run measured both: NCCL all-to-all kernels 1.9x longer and grouped GEMMs 7%
slower with the overlap than without it (OLMoE-like shape, 2x H100).

PyTorch's SM carveout (``torch._C._set_sm_carveout_experimental``, read at launch time by
cuBLAS, by the CUTLASS grouped GEMM and by moekit's persistent Triton GEMMs,
:mod:`moekit.experts.triton_gmm`) makes those kernels target ``SMs - n`` SMs, so ``n``
stay free for the communication kernels. With ``overlap`` two streams run GEMMs at once, and
the SMs one leaves free the other may take: the carveout is a scheduling hint, measured in
``benchmarks/bench_ep.py`` (variant option ``:cN``), not a guarantee. It is a process-wide
setting, so this module only ever sets it around launches and puts the previous value back:

- :func:`sm_carveout`: a context manager for the kernels launched inside it;
- :func:`carved_out`: runs a function with the carveout in its forward launches *and* in its
  backward (an autograd node on its output sets it when the backward reaches the function,
  one on its input puts the previous value back when the input's gradient is done), which is
  how :class:`~moekit.parallel.ExpertParallelExperts` (``sm_carveout=n``) confines it to the
  expert layer, leaving a model's other GEMMs every SM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

__all__ = ["carved_out", "check_sm_carveout", "sm_carveout"]


def check_sm_carveout(num_sms, device: torch.device | None = None) -> int | None:
    """``num_sms`` if it is ``None`` or an int in ``[0, SMs of device)`` (any int ``>= 0``
    off CUDA); otherwise ``ValueError`` naming it."""
    if num_sms is None:
        return None
    if isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 0:
        raise ValueError(f"sm_carveout: expected None or an int >= 0 (SMs left free of GEMMs), got {num_sms!r}")
    if not hasattr(torch._C, "_set_sm_carveout_experimental"):
        raise ValueError("sm_carveout: this torch has no torch._C._set_sm_carveout_experimental; use None")
    if device is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).multi_processor_count
        if num_sms >= total:
            raise ValueError(f"sm_carveout: expected fewer than the {total} SMs of {device}, got {num_sms}")
    return num_sms


def _get() -> int | None:
    return torch._C._get_sm_carveout_experimental()


def _set(num_sms: int | None) -> None:
    torch._C._set_sm_carveout_experimental(num_sms)


@contextlib.contextmanager
def sm_carveout(num_sms: int | None, device: torch.device | None = None) -> Iterator[None]:
    """GEMMs launched inside leave ``num_sms`` SMs free (``None``: leave the setting alone).
    The previous setting is restored on exit. ``device`` (optional) bounds ``num_sms``."""
    num_sms = check_sm_carveout(num_sms, device)
    if num_sms is None:
        yield
        return
    previous = _get()
    _set(num_sms)
    try:
        yield
    finally:
        _set(previous)


class _Scope:
    """One call's carveout in the backward: :meth:`enter` when the backward reaches the
    function's output, :meth:`exit` once its input's gradient is done (each once, in order)."""

    def __init__(self, num_sms: int):
        self.num_sms = num_sms
        self.previous: list = []  # the value before enter(), while entered

    def enter(self) -> None:
        if not self.previous:
            self.previous.append(_get())
            _set(self.num_sms)

    def exit(self) -> None:
        if self.previous:
            _set(self.previous.pop())


class _OnBackward(torch.autograd.Function):
    """Identity whose backward first calls ``action()`` (on the host, when the autograd engine
    reaches this node: after every op that produces the gradient it receives)."""

    @staticmethod
    def forward(ctx, t, action):
        ctx.action = action
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        ctx.action()
        return grad, None


def carved_out(fn: Callable[..., torch.Tensor], num_sms: int | None, x: torch.Tensor, *args) -> torch.Tensor:
    """``fn(x, *args)`` with ``num_sms`` SMs left free of its GEMMs, in the forward and in the
    backward of its ops that lead to ``x``'s gradient (``None``: plain ``fn(x, *args)``).

    The backward part needs ``x`` to require a gradient (an activation inside a model does);
    otherwise only the forward is carved out. Every op of ``fn``'s backward that produces
    ``x``'s gradient is launched between the two markers; ops on other branches that the
    autograd engine runs in that interval are carved out too.
    """
    if num_sms is None:
        return fn(x, *args)
    tracked = torch.is_grad_enabled() and x.requires_grad
    scope = _Scope(num_sms)
    if tracked:
        x = _OnBackward.apply(x, scope.exit)
    with sm_carveout(num_sms):
        y = fn(x, *args)
    return _OnBackward.apply(y, scope.enter) if tracked and y.requires_grad else y
