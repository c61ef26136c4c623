"""The memory-bound steps of the grouped expert path, in plain torch, with dispatch to the
fused Triton kernels of :mod:`moekit.experts.triton_kernels` for CUDA tensors.

The torch versions are the readable definition (and the CPU path); the Triton kernels must
compute the same thing, which tests check in Triton's interpreter and on the GPU.

Conventions (see :mod:`moekit.experts.grouped`): ``N = T*K`` rows sorted by expert; rows
``>= offs_E[-1]`` belong to ``-1`` slots, hold garbage (``torch._grouped_mm`` leaves them
unwritten) and must never reach a result.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["act_forward", "act_backward", "decode_experts", "gather_sum", "permute_rows", "use_triton"]


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve tensors on ``t``'s device."""
    return t.device.type == "cuda" and _triton_available()


def _valid_rows(n: int, offs_E: torch.Tensor) -> torch.Tensor:
    """``[n, 1]`` bool: the row holds a real assignment (its value can be trusted)."""
    return (torch.arange(n, device=offs_E.device) < offs_E[-1])[:, None]


def act_forward(h_NH: torch.Tensor, offs_E: torch.Tensor, activation: str) -> torch.Tensor:
    """``[N, H]`` -> ``[N, F]``: ``silu(gate) * up`` (SwiGLU) or exact-erf GELU, fp32 math."""
    if use_triton(h_NH):
        from moekit.experts import triton_kernels

        return triton_kernels.act_forward(h_NH, offs_E, activation)
    h = h_NH.float()
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        a = F.silu(gate) * up
    else:
        a = F.gelu(h)
    return a.to(h_NH.dtype)


def act_backward(h_NH, dau_NF, weights_flat, order_N, offs_E, activation):
    """See :func:`moekit.experts.triton_kernels.act_backward`: returns ``dh_NH``,
    ``aw_NF = w * act(h)`` and ``dw_N = <dau, act(h)>`` (fp32) for the sorted rows."""
    if use_triton(h_NH):
        from moekit.experts import triton_kernels

        return triton_kernels.act_backward(h_NH, dau_NF, weights_flat, order_N, offs_E, activation)
    valid = _valid_rows(h_NH.shape[0], offs_E)
    h = torch.where(valid, h_NH.float(), 0.0)
    dau = torch.where(valid, dau_NF.float(), 0.0)
    w = weights_flat.float()[order_N][:, None]
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        s = torch.sigmoid(gate)
        silu = gate * s
        a = silu * up
        da = w * dau
        dh = torch.cat([da * up * s * (1 + gate * (1 - s)), da * silu], dim=-1)
    else:
        cdf = 0.5 * (1 + torch.erf(h * 0.5 ** 0.5))
        a = h * cdf
        dh = w * dau * (cdf + h * torch.exp(-0.5 * h * h) * (2 * torch.pi) ** -0.5)
    dw_N = (dau * a).sum(-1)
    return dh.to(h_NH.dtype), (w * a).to(h_NH.dtype), dw_N


def permute_rows(src_TD: torch.Tensor, order_N: torch.Tensor, inv_TK: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """Token rows in expert order: ``out[n] = src[order[n] // K]`` -> ``[N, D]`` in
    ``out_dtype``. Rows of ``-1`` slots (``n >= offs_E[-1]``) may be left unwritten."""
    if use_triton(src_TD):
        from moekit.experts import triton_kernels

        return triton_kernels.scatter_rows(src_TD, inv_TK, order_N.shape[0], out_dtype)
    return src_TD.to(out_dtype).index_select(0, order_N // inv_TK.shape[1])


def gather_sum(src_ND: torch.Tensor, inv_TK: torch.Tensor, weights_TK: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * src[inv[t, j]]``, slots with ``inv = -1`` skipped, fp32 sum."""
    if use_triton(src_ND):
        from moekit.experts import triton_kernels

        return triton_kernels.gather_sum(src_ND, inv_TK, weights_TK, out_dtype)
    valid = (inv_TK >= 0)[..., None]
    rows = torch.where(valid, src_ND[inv_TK.clamp(min=0)].float(), 0.0)  # [T, K, D]
    if weights_TK is not None:
        rows = rows * weights_TK.float()[..., None]
    return rows.sum(1).to(out_dtype)


def decode_experts(x_TD, indices_TK, weights_TK, w_in_EHD, w_out_EDF, activation) -> torch.Tensor:
    """Expert outputs for a few slots without sorting: each slot ``(t, j)`` runs its own
    expert's MLP (matrix-vector products), then ``y[t] = sum_j w[t, j] * y_slot``. ``[T, D]``.
    Forward only (the decode path of :mod:`moekit.experts.grouped`)."""
    T, K = indices_TK.shape
    if use_triton(x_TD):
        from moekit.experts import triton_decode, triton_kernels

        a_SF = triton_decode.slot_gate_up(x_TD, indices_TK, w_in_EHD, activation)
        y_SD = triton_decode.slot_down(a_SF, indices_TK, w_out_EDF)
        return triton_kernels.gather_sum(y_SD, None, weights_TK, x_TD.dtype, shape_TK=(T, K))
    live = (indices_TK >= 0).reshape(-1, 1)
    e_S = indices_TK.reshape(-1).clamp(min=0)
    x_SD = x_TD.float().repeat_interleave(K, dim=0)
    h_SH = torch.einsum("sd,shd->sh", x_SD, w_in_EHD.float()[e_S])
    if activation == "swiglu":
        gate, up = h_SH.chunk(2, dim=-1)
        a_SF = F.silu(gate) * up
    else:
        a_SF = F.gelu(h_SH)
    a_SF = a_SF.to(x_TD.dtype).float()  # same rounding point as the kernels
    y_SD = torch.where(live, torch.einsum("sf,sdf->sd", a_SF, w_out_EDF.float()[e_S]), 0.0)
    y_SD = y_SD.to(x_TD.dtype).float() * weights_TK.float().reshape(-1, 1)
    return y_SD.view(T, K, -1).sum(1).to(x_TD.dtype)
