"""Token rows to per-destination rows and back, with deterministic adjoints.

The deduplicated dispatch (:func:`moekit.parallel.dispatch.row_dispatch`) sends token ``t``
once to each rank ``p`` that holds one of its experts: row ``inv_TP[t, p]`` of the send
buffer (``-1``: none). Two maps follow, each the adjoint of the other:

- :func:`spread`: ``x_V[v] = x_T[token_V[v]]`` (a gather; its gradient is a gather-sum);
- :func:`collect`: ``y_T[t] = sum_p y_V[inv_TP[t, p]]`` (a gather-sum; its gradient is a gather).

A gather-sum over the ``P`` (few) rows of a token replaces an ``index_add`` scatter: no
atomics (deterministic), no fp32 copy of the rows and no casts around it. On CUDA it is the
fused Triton kernel of the expert backend (:func:`moekit.experts.steps.gather_sum`, fp32
accumulation, output in the activation dtype); elsewhere plain torch, accumulating in at
least fp32 (fp64 stays fp64).
"""

from __future__ import annotations

import torch

from moekit.experts import steps

__all__ = ["collect", "gather_sum_rows", "pad_rows", "spread", "sum_partials"]


def gather_sum_rows(src_VD: torch.Tensor, inv_TP: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_p src[inv[t, p]]`` over the entries ``inv >= 0`` -> ``[T, D]`` in
    ``src_VD.dtype``, summed in at least fp32."""
    if src_VD.shape[0] == 0:  # no rows (every entry -1): nothing to read, not even a pointer
        return src_VD.new_zeros(inv_TP.shape[0], src_VD.shape[1])
    if src_VD.dtype in (torch.bfloat16, torch.float16, torch.float32) and steps.use_triton(src_VD):
        return steps.gather_sum(src_VD.contiguous(), inv_TP.contiguous(), None, src_VD.dtype)
    acc = torch.promote_types(src_VD.dtype, torch.float32)
    valid_TP1 = (inv_TP >= 0)[..., None]
    rows_TPD = src_VD[inv_TP.clamp(min=0)].to(acc)
    return torch.where(valid_TP1, rows_TPD, 0.0).sum(1).to(src_VD.dtype)


class _Spread(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_V, inv_TP):
        ctx.save_for_backward(inv_TP)
        return x_TD.index_select(0, token_V)

    @staticmethod
    def backward(ctx, grad_VD):
        (inv_TP,) = ctx.saved_tensors
        return gather_sum_rows(grad_VD, inv_TP), None, None


class _Collect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_VD, token_V, inv_TP):
        ctx.save_for_backward(token_V)
        return gather_sum_rows(y_VD, inv_TP)

    @staticmethod
    def backward(ctx, grad_TD):
        (token_V,) = ctx.saved_tensors
        return grad_TD.index_select(0, token_V), None, None


def spread(x_TD: torch.Tensor, token_V: torch.Tensor, inv_TP: torch.Tensor) -> torch.Tensor:
    """Rows ``x_TD[token_V]`` ``[V, D]``; ``inv_TP`` ``[T, P]`` must be the inverse of
    ``token_V`` (``inv_TP[token_V[v], p] == v`` for exactly one ``p``; ``-1`` elsewhere).
    Differentiable in ``x_TD``: the gradient is ``gather_sum_rows(grad, inv_TP)``."""
    return _Spread.apply(x_TD, token_V, inv_TP)


def collect(y_VD: torch.Tensor, token_V: torch.Tensor, inv_TP: torch.Tensor) -> torch.Tensor:
    """``[T, D]`` sum of each token's rows (the adjoint of :func:`spread`). Differentiable
    in ``y_VD``: the gradient is ``grad[token_V]``."""
    return _Collect.apply(y_VD, token_V, inv_TP)


def pad_rows(cap: int, x_TD: torch.Tensor, slot_TK: torch.Tensor,
             weights_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed-size dispatch's ``C = cap`` rows of this rank: ``x_CD``, ``slot_CK``,
    ``weights_CK``, the ``T`` token rows then zero rows with no choice (slot ``-1``, weight 0);
    the inputs themselves when ``T = C``."""
    pad = cap - x_TD.shape[0]
    if pad == 0:
        return x_TD, slot_TK, weights_TK
    return (torch.cat([x_TD, x_TD.new_zeros(pad, x_TD.shape[1])]),
            torch.cat([slot_TK, slot_TK.new_full((pad, slot_TK.shape[1]), -1)]),
            torch.cat([weights_TK, weights_TK.new_zeros(pad, weights_TK.shape[1])]))


def sum_partials(y_BD: torch.Tensor, num_blocks: int, cap: int, num_tokens: int,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """``[T, D]`` in ``out_dtype``: the sum over ``num_blocks`` blocks of ``cap`` rows (``y_BD``,
    ``B = num_blocks * cap``, each block one rank's partial sums for this rank's rows) of their
    first ``num_tokens`` rows, accumulated in at least fp32."""
    # no slice where the blocks hold exactly T rows: a slice's backward would allocate zeros
    # of the whole input and copy the gradient in (a memset and a copy of [B, D] on the
    # backward's critical path, the combine's gradient being the first thing it exchanges)
    if num_blocks == 1:  # one partial: the sum is the block itself
        return (y_BD if num_tokens == cap else y_BD[:num_tokens]).to(out_dtype)
    acc = torch.promote_types(out_dtype, torch.float32)
    blocks = y_BD.view(num_blocks, cap, -1)
    return (blocks if num_tokens == cap else blocks[:, :num_tokens]).sum(0, dtype=acc).to(out_dtype)
