"""Dropless grouped-GEMM expert computation behind ``torch.library`` custom ops.

Forward, for ``T`` tokens, ``K`` slots each (``N = T*K`` assignments, ``-1`` slots included):

1. ``moekit::route_by_expert``: stable sort of the slots by expert (``-1`` last), the
   cumulative per-expert ends ``offs_E`` (int32, computed on the device with a
   ``searchsorted``: no host sync), the slot of each sorted row ``order_N`` and the sorted row
   of each slot ``inv_TK`` (``-1`` for empty slots).
2. ``moekit::experts_grouped_fwd``: permute ``x`` into expert order (``x[order // K]``,
   written by a Triton scatter that reads each token row once), ``torch._grouped_mm`` with the
   fused ``[E, H, D]`` gate+up weight, SwiGLU / GELU (Triton), ``torch._grouped_mm`` with
   ``[E, D, F]``, then the weighted un-permute ``y[t] = sum_j w[t, j] * y_sorted[inv[t, j]]``
   (Triton, fp32 accumulation, deterministic). Saves the gathered input ``x_ND`` and the
   gate+up output ``h_NH``; the activation and the expert outputs are recomputed / never
   stored.
3. ``moekit::experts_grouped_bwd``: gathers ``dout`` by token, one grouped GEMM with the
   down weight gives the *unweighted* hidden gradient; a fused kernel recomputes the
   activation, applies the routing weight and yields the routing-weight gradient as a row dot
   (so the expert outputs are never stored), then two grouped GEMMs give the weight
   gradients, one the input gradient, and a gather-sum un-permutes it.

Two or more calls on the same weights whose outputs are summed (the overlap modes of expert
parallelism: own rows and received rows) can share one weight gradient: given one
:class:`~moekit.experts.join.WeightGradJoin`, the later calls' weight-gradient GEMMs add into
the first call's output in their epilogue instead of autograd adding two full gradients
(:func:`experts_grouped_sorted`). Without a join nothing changes.

Decode-sized calls (``T*K <= DECODE_MAX_SLOTS`` with no gradient needed) skip the sort:
``moekit::experts_decode`` runs each slot's expert as matrix-vector products in Triton
(:mod:`moekit.experts.triton_decode`), reading each chosen expert's weights once. Eager calls
launch its kernels directly (the op's dispatch is host time a decode step cannot spare);
``torch.compile`` traces the op.

GEMMs accumulate in fp32. In bf16 / fp16 on Hopper they are moekit's Triton kernels
(:mod:`moekit.experts.triton_gmm`, selected in :func:`_triton_gmm_serves`), else
``torch._grouped_mm`` (CUTLASS). The ops have fake (meta) implementations and a
registered autograd formula, so ``torch.compile(fullgraph=True)`` treats them as opaque nodes.
Under autocast the floating inputs are cast to the autocast dtype first (routing weights
stay in their own dtype). On CPU the same ops run with ``torch._grouped_mm``'s CPU kernel and
the torch versions of the fused steps (:mod:`moekit.experts.steps`).
"""

from __future__ import annotations

import torch

from moekit.experts import steps
from moekit.experts.join import WeightGradJoin
from moekit.experts.sorted import experts_sorted

__all__ = ["DECODE_MAX_SLOTS", "FUSED_SWIGLU_MIN_DIM", "experts_grouped_mm", "experts_grouped_sorted",
           "grouped_mm_supported", "route_by_expert"]

# Up to this many token-expert slots (T*K) an inference call takes the per-slot decode kernels:
# sorting costs several launches. Measured on an H100 (benchmarks/bench_layer.py, CUDA graphs):
# at T*K = 64 (OLMoE / Qwen3 shapes, T = 8) they beat the sorted grouped-GEMM path by 1.3-1.4x,
# at T*K = 512 the grouped GEMM wins (slots sharing an expert re-read its weights).
DECODE_MAX_SLOTS = 64


# ---------------------------------------------------------------------------------------------
# Routing metadata
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("moekit::route_by_expert", mutates_args=())
def route_by_expert(indices_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """indices_TK ``[T, K]`` (``-1`` = no expert) -> ``order_N [N]`` (slot of each sorted row,
    int64), ``inv_TK [T, K]`` (sorted row of each slot or ``-1``, int64), ``offs_E [E]``
    (int32 end of each expert's rows). Experts appear in ascending order, stably."""
    flat = indices_TK.reshape(-1)
    empty = flat < 0
    # int32 keys: half the radix-sort passes of int64.
    key = torch.where(empty, num_experts, flat).to(torch.int32)
    sorted_key, order_N = torch.sort(key, stable=True)
    experts = torch.arange(num_experts, device=flat.device, dtype=sorted_key.dtype)
    offs_E = torch.searchsorted(sorted_key, experts, right=True, out_int32=True)
    inv = torch.empty_like(order_N)
    inv[order_N] = torch.arange(order_N.numel(), device=flat.device)
    inv_TK = torch.where(empty, -1, inv).view(indices_TK.shape)
    return order_N, inv_TK, offs_E


@route_by_expert.register_fake
def _(indices_TK, num_experts):
    n = indices_TK.numel()
    dev = indices_TK.device
    return (torch.empty(n, dtype=torch.int64, device=dev),
            torch.empty(indices_TK.shape, dtype=torch.int64, device=dev),
            torch.empty(num_experts, dtype=torch.int32, device=dev))


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


def _triton_gmm_serves(a: torch.Tensor) -> bool:
    """Selection rule: moekit's Triton grouped GEMM (:mod:`moekit.experts.triton_gmm`) replaces
    ``torch._grouped_mm`` for bf16 / fp16 operands on a Hopper-or-newer GPU (it loads through
    TMA descriptors), in both layouts of this module, i.e. all six GEMMs of a step, where the
    operands' rows are 16-byte aligned (:func:`~moekit.experts.triton_gmm.gmm_supported`,
    checked in :func:`_gmm`). fp32 stays on ``torch._grouped_mm`` (the Triton kernel's exact fp32
    dot is slow), and so does anything older than Hopper.

    Measured on an H100 (``benchmarks/bench_gmm.py``, ``benchmarks/results/gmm_h100_2026-11-28.json``,
    36 GEMMs: six per shape, OLMoE / Qwen3 / Mixtral / DeepSeek slice, uniform and Zipf group
    sizes), the best of six tile configurations per GEMM: summed over the six, 3-7% faster than
    ``torch._grouped_mm`` on every shape and routing; GEMM by GEMM it lost on one (Mixtral
    ``dx``, 2.7%, every round) and four others were within the run's round-to-round spread.
    With the kernels' defaults, the whole fwd+bwd step in one process took 1.2-6% less time than
    with ``torch._grouped_mm`` on all four shapes (``gmm_defaults_ab_h100_2026-11-28.json``)."""
    return (a.dtype in (torch.bfloat16, torch.float16) and steps.use_triton(a)
            and torch.cuda.get_device_capability(a.device)[0] >= 9)


def _gmm(a_NK: torch.Tensor, w: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """M-grouped ``torch._grouped_mm(a_NK, w, offs=offs_E)``: ``a_NK [N, K]`` with ``w [E, K, O]``,
    row-major or a transposed view of a row-major ``[E, O, K]``; ``[N, O]`` out. See
    :func:`_triton_gmm_serves` for which kernel runs."""
    if _triton_gmm_serves(a_NK):
        from moekit.experts import triton_gmm

        # The kernel takes row-major operands: a transposed view is passed as its row-major base.
        w_is_ok = w.stride(-2) == 1  # a transposed view of a row-major [E, O, K] weight
        base = w.transpose(-2, -1) if w_is_ok else w
        if triton_gmm.gmm_supported(a_NK, base):
            return triton_gmm.gmm_m_grouped(a_NK, base, offs_E, w_is_ok=w_is_ok)
    return torch._grouped_mm(a_NK, w, offs=offs_E)


def _weight_grad(a_NM: torch.Tensor, b_NO: torch.Tensor, offs_E: torch.Tensor,
                 into: torch.Tensor | None = None) -> torch.Tensor:
    """K-grouped weight gradient ``[E, M, O]``: ``a_NM[rows_e]^T @ b_NO[rows_e]`` per expert
    (zeros for an expert without rows). ``into``: added to that tensor in place and returned
    instead, the join's accumulation: moekit's Triton kernel adds in its epilogue (fp32, one
    rounding, no extra pass); where ``torch._grouped_mm`` serves (fp32, CPU, pre-Hopper; it has
    no ``out``), the product is added by a separate ``add_``, the pass the join saves on the GPU."""
    if _triton_gmm_serves(a_NM):
        from moekit.experts import triton_gmm

        if triton_gmm.gmm_supported(a_NM, b_NO, *(() if into is None else (into,))):
            return triton_gmm.gmm_k_grouped(a_NM, b_NO, offs_E, out=into, accumulate=into is not None)
    dw_EMO = torch._grouped_mm(a_NM.t(), b_NO, offs=offs_E)
    return dw_EMO if into is None else into.add_(dw_EMO)


# The SwiGLU runs in the gate+up GEMM's epilogue from this model width up. Same-process A/B on
# an H100, sixth session (results/swiglu_ab_h100_2026-11-28.json, four rounds): forward 8.95 vs
# 9.83 ms Mixtral (D = 4096), 9.38 vs 9.99 ms DeepSeek slice (D = 7168), forward+backward
# unchanged; at D = 2048 OLMoE's forward+backward 2.7% slower. Rerun after the seventh session's
# GEMM defaults (benchmarks/ab_layer.py, results/layer_ab_h100_2026-11-28_s7.json, six rounds):
# no shape moves by more than 1.2% either way, so the threshold stands.
FUSED_SWIGLU_MIN_DIM = 4096


def _gate_up_act(x_ND: torch.Tensor, w_in_EHD: torch.Tensor, offs_E: torch.Tensor,
                 activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``h_NH [N, H]`` (the gate+up projection, kept for the backward) and ``a_NF [N, F]`` (its
    activation). SwiGLU with ``D >= FUSED_SWIGLU_MIN_DIM`` on the Triton GEMMs' GPUs runs in the
    GEMM's epilogue (:mod:`moekit.experts.triton_gmm_swiglu`: ``h`` is not read back);
    otherwise the GEMM, then the activation kernel."""
    if activation == "swiglu" and x_ND.shape[1] >= FUSED_SWIGLU_MIN_DIM and _triton_gmm_serves(x_ND):
        from moekit.experts import triton_gmm_swiglu

        if triton_gmm_swiglu.gate_up_swiglu_supported(x_ND, w_in_EHD):
            return triton_gmm_swiglu.gmm_gate_up_swiglu(x_ND, w_in_EHD, offs_E)
    h_NH = _gmm(x_ND, w_in_EHD.transpose(-2, -1), offs_E)
    return h_NH, steps.act_forward(h_NH, offs_E, activation)


@torch.library.custom_op("moekit::experts_grouped_fwd", mutates_args=())
def _experts_fwd(x_TD: torch.Tensor, weights_TK: torch.Tensor, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor,
                 order_N: torch.Tensor, inv_TK: torch.Tensor, offs_E: torch.Tensor,
                 activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``y_TD [T, D]`` and, for the backward, ``h_NH [N, H]`` and ``x_ND [N, D]``."""
    x_ND = steps.permute_rows(x_TD, order_N, inv_TK, x_TD.dtype)
    h_NH, a_NF = _gate_up_act(x_ND, w_in_EHD, offs_E, activation)
    y_ND = _gmm(a_NF, w_out_EDF.transpose(-2, -1), offs_E)
    y_TD = steps.gather_sum(y_ND, inv_TK, weights_TK, x_TD.dtype)
    return y_TD, h_NH, x_ND


@_experts_fwd.register_fake
def _(x_TD, weights_TK, w_in_EHD, w_out_EDF, order_N, inv_TK, offs_E, activation):
    N = order_N.shape[0]
    return x_TD.new_empty(x_TD.shape), x_TD.new_empty(N, w_in_EHD.shape[1]), x_TD.new_empty(N, x_TD.shape[1])


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("moekit::experts_grouped_bwd", mutates_args=())
def _experts_bwd(dy_TD: torch.Tensor, x_ND: torch.Tensor, weights_TK: torch.Tensor, w_in_EHD: torch.Tensor,
                 w_out_EDF: torch.Tensor, order_N: torch.Tensor, inv_TK: torch.Tensor, offs_E: torch.Tensor,
                 h_NH: torch.Tensor, activation: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``dx_TD``, ``dweights_TK``, ``dw_in_EHD``, ``dw_out_EDF``."""
    dy_ND, dh_NH, aw_NF, dw_N = _hidden_grads(dy_TD, x_ND, weights_TK, w_out_EDF, order_N, inv_TK, offs_E, h_NH,
                                              activation)
    dw_out_EDF = _weight_grad(dy_ND, aw_NF, offs_E)
    dw_in_EHD = _weight_grad(dh_NH, x_ND, offs_E)
    dx_TD, dweights_TK = _input_grads(dh_NH, dw_N, w_in_EHD, inv_TK, offs_E, weights_TK.dtype)
    return dx_TD, dweights_TK, dw_in_EHD, dw_out_EDF


def _hidden_grads(dy_TD, x_ND, weights_TK, w_out_EDF, order_N, inv_TK, offs_E, h_NH, activation):
    """The backward up to the hidden layer: ``dy_ND`` (``dy`` in expert order), ``dh_NH``,
    ``aw_NF`` (weighted activation, the down projection's input) and ``dw_N`` (routing-weight
    gradient per sorted row, fp32)."""
    dy_ND = steps.permute_rows(dy_TD, order_N, inv_TK, x_ND.dtype)
    # Gradient of the unweighted hidden: dout[token] @ W_out (the routing weight is applied in
    # the fused activation backward, which also yields d(weight) = <dau, a>).
    dau_NF = _gmm(dy_ND, w_out_EDF, offs_E)
    dh_NH, aw_NF, dw_N = steps.act_backward(h_NH, dau_NF, weights_TK.reshape(-1), order_N, offs_E, activation)
    return dy_ND, dh_NH, aw_NF, dw_N


def _input_grads(dh_NH, dw_N, w_in_EHD, inv_TK, offs_E, weights_dtype):
    """``dx_TD`` (the gate+up projection's input gradient, un-permuted) and ``dweights_TK``."""
    dx_ND = _gmm(dh_NH, w_in_EHD, offs_E)
    dx_TD = steps.gather_sum(dx_ND, inv_TK, None, dh_NH.dtype)
    dweights_TK = torch.where(inv_TK >= 0, dw_N[inv_TK.clamp(min=0)], 0.0).to(weights_dtype)
    return dx_TD, dweights_TK


@_experts_bwd.register_fake
def _(dy_TD, x_ND, weights_TK, w_in_EHD, w_out_EDF, order_N, inv_TK, offs_E, h_NH, activation):
    return (dy_TD.new_empty(dy_TD.shape, dtype=x_ND.dtype), weights_TK.new_empty(weights_TK.shape),
            w_in_EHD.new_empty(w_in_EHD.shape), w_out_EDF.new_empty(w_out_EDF.shape))


def _setup_context(ctx, inputs, output):
    x_TD, weights_TK, w_in_EHD, w_out_EDF, order_N, inv_TK, offs_E, activation = inputs
    ctx.activation = activation
    # h_NH and x_ND are outputs only so that they can be saved: never materialise zero
    # gradients for them (two [N, H] / [N, D] fills per step otherwise).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[2], weights_TK, w_in_EHD, w_out_EDF, order_N, inv_TK, offs_E, output[1])


def _backward(ctx, dy_TD, _dh_unused, _dx_unused):
    if dy_TD is None:
        return None, None, None, None, None, None, None, None
    x_ND, weights_TK, w_in_EHD, w_out_EDF, order_N, inv_TK, offs_E, h_NH = ctx.saved_tensors
    dx, dw, dw_in, dw_out = _experts_bwd(dy_TD.contiguous(), x_ND, weights_TK, w_in_EHD, w_out_EDF,
                                         order_N, inv_TK, offs_E, h_NH, ctx.activation)
    return dx, dw, dw_in, dw_out, None, None, None, None


_experts_fwd.register_autograd(_backward, setup_context=_setup_context)


class _JoinedExperts(torch.autograd.Function):
    """The forward op with a backward that joins its weight gradient with the other calls of
    ``join`` (:mod:`moekit.experts.join`). The backward computes the input gradients first, so
    that they run beside the other calls' work, and the weight gradients last: new tensors for
    the first call to get there, accumulated into them (after waiting for their writes) for the
    others. Eager only (``torch.compile`` of the overlap modes is not supported anyway: they
    switch CUDA streams)."""

    @staticmethod
    def forward(ctx, x_TD, weights_TK, w_in_EHD, w_out_EDF, order_N, inv_TK, offs_E, activation, join):
        y_TD, h_NH, x_ND = _experts_fwd(x_TD, weights_TK, w_in_EHD, w_out_EDF, order_N, inv_TK, offs_E, activation)
        join.register(w_in_EHD, w_out_EDF)
        ctx.activation, ctx.join = activation, join
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x_ND, weights_TK, w_in_EHD, w_out_EDF, order_N, inv_TK, offs_E, h_NH)
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        join: WeightGradJoin = ctx.join
        if dy_TD is None:  # no gradient reached this call: it adds nothing, but it still counts
            dw_in, dw_out = join.deliver(None, None)
            return None, None, dw_in, dw_out, None, None, None, None, None
        x_ND, weights_TK, w_in_EHD, w_out_EDF, order_N, inv_TK, offs_E, h_NH = ctx.saved_tensors
        dy_ND, dh_NH, aw_NF, dw_N = _hidden_grads(dy_TD.contiguous(), x_ND, weights_TK, w_out_EDF, order_N, inv_TK,
                                                  offs_E, h_NH, ctx.activation)
        dx_TD, dweights_TK = _input_grads(dh_NH, dw_N, w_in_EHD, inv_TK, offs_E, weights_TK.dtype)
        into_in, into_out = join.into() or (None, None)
        dw_in_EHD = _weight_grad(dh_NH, x_ND, offs_E, into_in)
        dw_out_EDF = _weight_grad(dy_ND, aw_NF, offs_E, into_out)
        dw_in_EHD, dw_out_EDF = join.deliver(dw_in_EHD, dw_out_EDF)
        return dx_TD, dweights_TK, dw_in_EHD, dw_out_EDF, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Decode (few slots, no gradient)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("moekit::experts_decode", mutates_args=())
def _experts_decode(x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor, w_in_EHD: torch.Tensor,
                    w_out_EDF: torch.Tensor, activation: str) -> torch.Tensor:
    """Per-slot expert MLPs, no sort: ``y_TD [T, D]`` (forward only)."""
    return steps.decode_experts(x_TD, indices_TK, weights_TK, w_in_EHD, w_out_EDF, activation)


@_experts_decode.register_fake
def _(x_TD, indices_TK, weights_TK, w_in_EHD, w_out_EDF, activation):
    return x_TD.new_empty(x_TD.shape)


# ---------------------------------------------------------------------------------------------
# Public entry point (the "grouped_mm" backend)
# ---------------------------------------------------------------------------------------------


def grouped_mm_supported(x_TD: torch.Tensor, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: fp32 / bf16 / fp16, one dtype, and
    every row of every operand (and of the transposed intermediates) 16-byte aligned."""
    if x_TD.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if not (x_TD.dtype == w_in_EHD.dtype == w_out_EDF.dtype):
        return False
    size = x_TD.element_size()
    dims = (x_TD.shape[1], w_in_EHD.shape[1], w_out_EDF.shape[2])
    return all(d * size % 16 == 0 for d in dims) and x_TD.shape[0] > 0


def _check_operands(x_TD, indices_TK, weights_TK, w_in_EHD, w_out_EDF, activation) -> None:
    """ValueError naming the first operand whose shape or kind breaks the contract."""
    if activation not in ("swiglu", "gelu"):
        raise ValueError(f"activation: expected 'swiglu' or 'gelu', got {activation!r}")
    if x_TD.ndim != 2 or w_in_EHD.ndim != 3 or w_out_EDF.ndim != 3:
        raise ValueError(f"x_TD, w_in_EHD, w_out_EDF: expected 2, 3 and 3 dimensions, got shapes "
                         f"{tuple(x_TD.shape)}, {tuple(w_in_EHD.shape)}, {tuple(w_out_EDF.shape)}")
    T, D = x_TD.shape
    E, _, F = w_out_EDF.shape
    H = 2 * F if activation == "swiglu" else F
    if indices_TK.ndim != 2 or indices_TK.shape[0] != T or indices_TK.is_floating_point():
        raise ValueError(f"indices_TK: expected an integer tensor of shape [{T}, K], got "
                         f"{indices_TK.dtype} {tuple(indices_TK.shape)}")
    if tuple(weights_TK.shape) != tuple(indices_TK.shape):
        raise ValueError(f"weights_TK: expected shape {tuple(indices_TK.shape)}, got {tuple(weights_TK.shape)}")
    if tuple(w_in_EHD.shape) != (E, H, D) or w_out_EDF.shape[1] != D:
        raise ValueError(f"w_in_EHD / w_out_EDF: expected [{E}, {H}, {D}] and [{E}, {D}, {F}] for "
                         f"{activation}, got {tuple(w_in_EHD.shape)} and {tuple(w_out_EDF.shape)}")


def experts_grouped_mm(
    x_TD: torch.Tensor,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    activation: str,
    *,
    join: WeightGradJoin | None = None,
) -> torch.Tensor:
    """Same contract as :func:`moekit.experts.reference.experts_reference`; ``[T, D]`` out.

    Falls back to :func:`moekit.experts.sorted.experts_sorted` for operands the grouped GEMM
    does not take (fp64, unaligned widths, no tokens); that path ignores ``join`` (autograd
    adds its weight gradient). ``join``: see :func:`experts_grouped_sorted`.
    """
    _check_operands(x_TD, indices_TK, weights_TK, w_in_EHD, w_out_EDF, activation)
    if torch.is_autocast_enabled(x_TD.device.type):
        dtype = torch.get_autocast_dtype(x_TD.device.type)
        x_TD, w_in_EHD, w_out_EDF = x_TD.to(dtype), w_in_EHD.to(dtype), w_out_EDF.to(dtype)
    if not grouped_mm_supported(x_TD, w_in_EHD, w_out_EDF):
        return experts_sorted(x_TD, indices_TK, weights_TK, w_in_EHD, w_out_EDF, activation)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_TD, weights_TK, w_in_EHD, w_out_EDF))
    if indices_TK.numel() <= DECODE_MAX_SLOTS and not needs_grad and steps.use_triton(x_TD):
        # Eager decode is host-bound (a few us of GPU work per kernel): outside tracing, call the
        # kernels directly and skip the custom op's dispatch; torch.compile still sees the op.
        decode = _experts_decode if torch.compiler.is_compiling() else steps.decode_experts
        return decode(x_TD.contiguous(), indices_TK.contiguous(), weights_TK.contiguous(),
                      w_in_EHD.contiguous(), w_out_EDF.contiguous(), activation)
    order_N, inv_TK, offs_E = route_by_expert(indices_TK, w_in_EHD.shape[0])
    # Contiguous operands: the kernels index rows with one stride and slots as t*K + j.
    return experts_grouped_sorted(x_TD.contiguous(), weights_TK.contiguous(), w_in_EHD.contiguous(),
                                  w_out_EDF.contiguous(), order_N, inv_TK, offs_E, activation,
                                  join if needs_grad else None)


def experts_grouped_sorted(x_TD: torch.Tensor, weights_TK: torch.Tensor, w_in_EHD: torch.Tensor,
                           w_out_EDF: torch.Tensor, order_N: torch.Tensor, inv_TK: torch.Tensor,
                           offs_E: torch.Tensor, activation: str, join: WeightGradJoin | None = None) -> torch.Tensor:
    """The grouped expert ops on a routing already sorted by :func:`route_by_expert` (all
    operands contiguous; ``order_N`` may be cut to the valid rows): ``y_TD [T, D]``. ``join``:
    this call's weight gradient is joined with the other calls given the same join (module
    docstring); ``None``, or no gradient recorded: the custom op with its own backward."""
    if join is not None and torch.is_grad_enabled() and any(
            t.requires_grad for t in (x_TD, weights_TK, w_in_EHD, w_out_EDF)):
        return _JoinedExperts.apply(x_TD, weights_TK, w_in_EHD, w_out_EDF, order_N, inv_TK, offs_E, activation, join)
    y_TD, _, _ = _experts_fwd(x_TD, weights_TK, w_in_EHD, w_out_EDF, order_N, inv_TK, offs_E, activation)
    return y_TD
