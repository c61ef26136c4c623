"""WeightGradJoin (moekit.experts.join): expert calls on the same weights sharing one weight
gradient give the gradients autograd's sum gives, whichever call's backward runs first, with
calls that get no gradient, repeated backward passes, accumulation into existing ``.grad``;
a registered call left out of the backward is an error, not a lost gradient.

CPU: the grouped ops on ``torch._grouped_mm``'s CPU kernel (fp32); the accumulation there is
an ``add_`` after the product. GPU (``-m gpu``): bf16 on moekit's Triton kernels, which add in
the GEMM's epilogue, with the two calls on two CUDA streams as in the overlap modes."""

from __future__ import annotations

import contextlib

import pytest
import torch

from moekit.experts.grouped import experts_grouped_mm
from moekit.experts.join import WeightGradJoin

E, D, F = 6, 16, 8


def _inputs(device, dtype, sizes=(13, 7), top_k=3, seed=0):
    """Weights (leaves) and per-call (x, indices, weights, dy); call 1 leaves expert 5 empty."""
    gen = torch.Generator().manual_seed(seed)
    w_in = (torch.randn(E, 2 * F, D, generator=gen) * D ** -0.5).to(device, dtype).requires_grad_()
    w_out = (torch.randn(E, D, F, generator=gen) * F ** -0.5).to(device, dtype).requires_grad_()
    calls = []
    for i, T in enumerate(sizes):
        idx = torch.stack([torch.randperm(E - (i == 1), generator=gen)[:top_k] for _ in range(T)])
        idx[0, -1] = -1  # an empty slot
        x = torch.randn(T, D, generator=gen).to(device, dtype).requires_grad_()
        w = torch.rand(T, top_k, generator=gen).to(device, dtype).requires_grad_()
        dy = torch.randn(T, D, generator=gen).to(device, dtype)
        calls.append((x, idx.to(device), w, dy))
    return w_in, w_out, calls


def _grads(w_in, w_out, calls, join, order=(0, 1), streams=None, retain=False, passes=1):
    """Run the calls in ``order`` (creation order decides which backward autograd runs first:
    the later one), sum ``(y_i * dy_i)``, backward; return every gradient."""
    for t in (w_in, w_out, *[c[0] for c in calls], *[c[2] for c in calls]):
        t.grad = None
    loss = 0
    for i in order:
        x, idx, w, dy = calls[i]
        with torch.cuda.stream(streams[i]) if streams else contextlib.nullcontext():
            y = experts_grouped_mm(x, idx, w, w_in, w_out, "swiglu", join=join)
            term = (y.float() * dy.float()).sum()
        if streams:  # the sum runs on the main stream
            torch.cuda.current_stream().wait_stream(streams[i])
        loss = loss + term
    for _ in range(passes):
        loss.backward(retain_graph=retain or passes > 1)
    return [t.grad.clone() for t in (w_in, w_out, *[c[0] for c in calls], *[c[2] for c in calls])]


def _close(got, want, tol):
    for g, w in zip(got, want):
        scale = w.abs().max().clamp_min(1.0)
        assert (g.double() - w.double()).abs().max() <= tol * scale, ((g - w).abs().max(), scale)


class _Spy(WeightGradJoin):
    """Records, per backward call, how many rows its dy had and whether it wrote new buffers."""

    def __init__(self):
        super().__init__()
        self.log = []

    def into(self):
        got = super().into()
        self.log.append(got is None)
        return got


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_join_equals_autograd_sum_either_order(order):
    w_in, w_out, calls = _inputs("cpu", torch.float32)
    want = _grads(w_in, w_out, calls, None, order)
    spy = _Spy()
    got = _grads(w_in, w_out, calls, spy, order)
    assert spy.calls == 2 and spy.log == [True, False]  # first writes, second accumulates
    _close(got, want, 1e-5)


def test_backward_order_follows_creation_order():
    """The later-created call's backward runs first (autograd's order), so the two orders
    above make each call once the writer and once the accumulator."""
    firsts = []
    for order in ((0, 1), (1, 0)):
        w_in, w_out, calls = _inputs("cpu", torch.float32)
        spy = _Spy()
        for i, (x, *_rest) in enumerate(calls):  # a leaf's hook fires right after its call's backward
            x.register_hook(lambda g, i=i, log=spy.log: log.append(i))
        _grads(w_in, w_out, calls, spy, order)
        assert spy.log[0] is True and spy.log[2] is False  # into (write), x hook, into (accumulate), x hook
        firsts.append(spy.log[1])
    assert firsts == [1, 0]


def test_retain_graph_and_existing_grads():
    """Two backward passes of one graph: the join resets after each; the second pass's
    gradients accumulate into ``.grad`` like autograd's."""
    w_in, w_out, calls = _inputs("cpu", torch.float32, seed=1)
    want = _grads(w_in, w_out, calls, None, passes=2)
    got = _grads(w_in, w_out, calls, WeightGradJoin(), passes=2)
    _close(got, want, 1e-5)


class _NoGrad(torch.autograd.Function):
    """Identity whose backward gives no gradient (``None``)."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        return None


def test_call_with_no_gradient_still_counts():
    w_in, w_out, calls = _inputs("cpu", torch.float32, seed=2)
    (x0, i0, v0, dy0), (x1, i1, v1, dy1) = calls

    def grads(join):
        for t in (w_in, w_out):
            t.grad = None
        y0 = _NoGrad.apply(experts_grouped_mm(x0, i0, v0, w_in, w_out, "swiglu", join=join))
        y1 = experts_grouped_mm(x1, i1, v1, w_in, w_out, "swiglu", join=join)
        ((y0 * dy0).sum() + (y1 * dy1).sum()).backward()
        return [w_in.grad.clone(), w_out.grad.clone()]

    _close(grads(WeightGradJoin()), grads(None), 1e-6)


def test_call_left_out_of_backward_raises():
    w_in, w_out, calls = _inputs("cpu", torch.float32, seed=3)
    join = WeightGradJoin()
    (x0, i0, v0, _), (x1, i1, v1, dy1) = calls
    experts_grouped_mm(x0, i0, v0, w_in, w_out, "swiglu", join=join)  # registered, never used
    y1 = experts_grouped_mm(x1, i1, v1, w_in, w_out, "swiglu", join=join)
    with pytest.raises(RuntimeError, match="join"):
        (y1 * dy1).sum().backward()


def test_register_checks_and_no_grad():
    join = WeightGradJoin()
    join.register(torch.zeros(2, 4, 3), torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="join"):
        join.register(torch.zeros(3, 4, 3), torch.zeros(3, 3, 2))
    # without a gradient to take, a call does not register (it would wait for a backward)
    w_in, w_out, calls = _inputs("cpu", torch.float32, seed=4)
    join = WeightGradJoin()
    with torch.no_grad():
        experts_grouped_mm(calls[0][0], calls[0][1], calls[0][2], w_in, w_out, "swiglu", join=join)
    assert join.calls == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_join_on_two_streams_bf16(order):
    """As the overlap runs them: each call on its own CUDA stream (autograd runs each backward
    on its forward's stream); bf16 on the Triton kernels (Hopper) or torch._grouped_mm."""
    torch.manual_seed(0)
    w_in, w_out, calls = _inputs("cuda", torch.bfloat16, sizes=(700, 300), top_k=4, seed=5)
    want = _grads(w_in, w_out, calls, None, order)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    got = _grads(w_in, w_out, calls, WeightGradJoin(), order, streams=streams)
    torch.cuda.synchronize()
    _close(got, want, 2e-2)
