"""SM carveout scoping (moekit.parallel.carveout): set around the forward launches and the
backward of the wrapped function, the previous process-wide value restored afterwards, never
leaked; results and gradients unchanged. CPU: the setting is stored but read by no kernel, so
what is checked is when it holds which value."""

from __future__ import annotations

import pytest
import torch

from moekit.parallel import carved_out, sm_carveout
from moekit.parallel.carveout import check_sm_carveout


def _get():
    return torch._C._get_sm_carveout_experimental()


@pytest.fixture(autouse=True)
def _clean_setting():
    before = _get()
    yield
    torch._C._set_sm_carveout_experimental(before)


class _Probe(torch.autograd.Function):
    """Identity that records the carveout at its forward and its backward."""

    @staticmethod
    def forward(ctx, x, log):
        ctx.log = log
        log.append(("fwd", _get()))
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(("bwd", _get()))
        return grad, None


def _fn(x, w, log):
    return _Probe.apply(x @ w, log).tanh()


def test_context_sets_and_restores_even_on_error():
    torch._C._set_sm_carveout_experimental(3)
    with sm_carveout(16):
        assert _get() == 16
        with sm_carveout(None):  # None leaves the setting alone
            assert _get() == 16
    assert _get() == 3
    with pytest.raises(RuntimeError):
        with sm_carveout(8):
            raise RuntimeError("boom")
    assert _get() == 3


@pytest.mark.parametrize("bad", [-1, 2.0, True, "8"])
def test_bad_carveout_names_the_argument(bad):
    with pytest.raises(ValueError, match="sm_carveout"):
        check_sm_carveout(bad)
    with pytest.raises(ValueError, match="sm_carveout"):
        with sm_carveout(bad):
            pass


@pytest.mark.parametrize("previous", [None, 5])
def test_forward_and_backward_scoped_results_unchanged(previous):
    torch._C._set_sm_carveout_experimental(previous)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    log_ref, log = [], []
    y_ref = _fn(x, w, log_ref)
    gx_ref, gw_ref = torch.autograd.grad(y_ref.sum(), (x, w))
    y = 2 * carved_out(_fn, 12, x, w, log)  # an op after the scope: its backward runs before entering
    assert _get() == previous and log == [("fwd", 12)]
    gx, gw = torch.autograd.grad(y.sum() / 2, (x, w))
    assert log == [("fwd", 12), ("bwd", 12)]
    assert _get() == previous  # restored once x's gradient was done
    assert torch.equal(y / 2, y_ref) and torch.equal(gx, gx_ref) and torch.equal(gw, gw_ref)
    assert log_ref == [("fwd", previous), ("bwd", previous)]


def test_layers_in_sequence_each_scoped():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    log1, log2, between = [], [], []
    h = carved_out(_fn, 8, x, w1, log1)
    h = _Probe.apply(h, between)  # a dense op between two expert layers keeps every SM
    y = carved_out(_fn, 16, h, w2, log2)
    y.sum().backward()
    assert log2 == [("fwd", 16), ("bwd", 16)] and log1 == [("fwd", 8), ("bwd", 8)]
    assert between == [("fwd", None), ("bwd", None)]
    assert _get() is None


def test_input_without_gradient_scopes_the_forward_only():
    x = torch.randn(4, 3, dtype=torch.float64)  # e.g. a first layer's input
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    log = []
    y = carved_out(_fn, 8, x, w, log)
    y.sum().backward()
    assert log == [("fwd", 8), ("bwd", None)] and _get() is None and w.grad is not None
    with torch.no_grad():
        carved_out(_fn, 8, x.requires_grad_(), w, log)
    assert log[-1] == ("fwd", 8) and _get() is None


def test_none_is_the_plain_call():
    x = torch.randn(2, 3, requires_grad=True)
    w = torch.randn(3, 3)
    log = []
    y = carved_out(_fn, None, x, w, log)
    assert y.grad_fn is not None and log == [("fwd", None)]
