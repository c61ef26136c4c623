"""Balance objectives: Switch load-balancing loss at micro / sequence / global-batch scope,
z-loss, and loss-free bias balancing (DESIGN.md, "Definitions").

The loss functions are pure; the two stateful pieces (the global-batch count buffer and the
loss-free bias) are small modules whose buffers live in each MoE layer, never globally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "switch_loss",
    "sequence_switch_loss",
    "z_loss",
    "GlobalBalance",
    "AuxFreeBias",
    "all_reduce_counts",
]


def switch_loss(counts_S: torch.Tensor, probs_TS: torch.Tensor, num_tokens, top_k: int) -> torch.Tensor:
    """Switch load-balancing loss ``S * sum_s f_s * P_s``.

    counts_S: ``[S]`` assignments per slot (detached) over the tokens ``f`` is counted on.
    probs_TS: ``[T, S]`` router probabilities of the tokens ``P`` is averaged over (local,
        differentiable). num_tokens: the number of tokens ``counts_S`` was counted over.
    ``f_s = counts_s / (top_k * num_tokens)``.
    """
    num_slots = probs_TS.shape[-1]
    if probs_TS.shape[0] == 0:
        return probs_TS.sum() * 0.0
    f_S = counts_S.to(torch.float32) / (top_k * num_tokens)
    p_S = probs_TS.float().mean(dim=0)
    return num_slots * (f_S * p_S).sum()


def sequence_switch_loss(assign_BSE: torch.Tensor, probs_BSE: torch.Tensor, top_k: int) -> torch.Tensor:
    """DeepSeek-V2/V3 sequence-wise balance loss: the Switch loss per sequence, averaged.

    assign_BSE: ``[B, S, E]`` 0/1 assignments (detached); probs_BSE: ``[B, S, E]``.
    """
    num_seqs, seq_len, num_slots = probs_BSE.shape
    if num_seqs == 0 or seq_len == 0:
        return probs_BSE.sum() * 0.0
    f_BE = assign_BSE.float().sum(dim=1) / (top_k * seq_len)
    p_BE = probs_BSE.float().mean(dim=1)
    return (num_slots * (f_BE * p_BE).sum(dim=1)).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean_t (logsumexp_e logits[t, e])^2`` (ST-MoE)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def _default_group(group):
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def all_reduce_counts(counts: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``counts`` over the data-parallel ``group`` (WORLD when initialised); a copy."""
    group = _default_group(group)
    out = counts.detach().clone()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


class GlobalBalance(nn.Module):
    """Global-batch load-balancing loss (Qiu et al. 2025).

    ``f`` is counted over the whole global batch: all-reduced over the data-parallel group and
    summed over the micro-batches of the current optimizer step in a running buffer, reset by
    :meth:`optimizer_step_done`. ``P`` stays local and differentiable. With one rank and one
    micro-batch it equals the micro-batch loss exactly.
    """

    def __init__(self, num_slots: int, top_k: int, group=None):
        super().__init__()
        self.top_k = top_k
        self.group = group
        self.register_buffer("counts", torch.zeros(num_slots, dtype=torch.float64), persistent=False)
        self.register_buffer("tokens", torch.zeros((), dtype=torch.float64), persistent=False)

    def forward(self, counts_S: torch.Tensor, probs_TS: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return switch_loss(counts_S, probs_TS, probs_TS.shape[0], self.top_k)
        step = torch.cat([counts_S.detach().to(torch.float64),
                          torch.tensor([float(probs_TS.shape[0])], dtype=torch.float64,
                                       device=counts_S.device)])
        step = all_reduce_counts(step, self.group)
        self.counts += step[:-1].to(self.counts.device)
        self.tokens += step[-1].to(self.tokens.device)
        return switch_loss(self.counts.to(probs_TS.device), probs_TS, self.tokens.to(probs_TS.device), self.top_k)

    def optimizer_step_done(self) -> None:
        self.counts.zero_()
        self.tokens.zero_()


class AuxFreeBias(nn.Module):
    """Loss-free balancing (Wang et al. 2024): a per-expert bias for *selection only*.

    Counts are accumulated (and all-reduced over the data-parallel group) during the training
    forwards of an optimizer step; :meth:`optimizer_step_done` applies
    ``b_e += rate * sign(mean_c - c_e)`` and resets them.
    """

    def __init__(self, num_experts: int, rate: float, group=None):
        super().__init__()
        if rate < 0:
            raise ValueError(f"bias_update_rate: expected >= 0, got {rate}")
        self.rate = rate
        self.group = group
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("counts", torch.zeros(num_experts, dtype=torch.float64), persistent=False)

    def accumulate(self, counts_E: torch.Tensor) -> None:
        if self.training:
            self.counts += all_reduce_counts(counts_E.to(torch.float64), self.group).to(self.counts.device)

    def optimizer_step_done(self) -> None:
        if self.counts.sum() > 0:
            self.bias += self.rate * torch.sign(self.counts.mean() - self.counts).to(self.bias.dtype)
        self.counts.zero_()
