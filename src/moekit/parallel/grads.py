"""Gradient and parameter synchronisation for expert parallelism combined with data parallelism.

Every rank of the data-parallel group sees different tokens. Dense parameters (router,
shared experts, everything outside the expert-parallel experts) are replicated on every rank:
their gradients are summed over the data-parallel group, as DDP does. An expert slot's
gradient already holds the contributions of the tokens of every rank of its EP group (they
came to it by all-to-all); it is summed with the other replicas of the same logical expert in
the EP group, and over the ``expert_dp_group`` (ranks holding the same slots in other EP
groups). With ``average=True`` everything is divided by the data-parallel world size: the
gradient of the mean over ranks of each rank's loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moekit.parallel.experts import ExpertParallelExperts

__all__ = ["reduce_gradients", "broadcast_dense_parameters", "dense_parameters"]


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``model`` that are replicated on every rank (not expert-parallel slots)."""
    expert = {id(p) for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in expert]


def _all_reduce_flat(tensors: list[torch.Tensor], group) -> None:
    """All-reduce (sum) ``tensors`` in place with one collective per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group_tensors in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group_tensors])
        dist.all_reduce(flat, group=group)
        for t, part in zip(group_tensors, torch.split(flat, [t.numel() for t in group_tensors])):
            t.copy_(part.view_as(t))


@torch.no_grad()
def reduce_gradients(model: nn.Module, dp_group=None, average: bool = True) -> None:
    """Make every gradient of an expert-parallel + data-parallel ``model`` the gradient of the
    global loss (see the module docstring). Collective over ``dp_group`` (default WORLD) and
    every EP / expert-DP group; call after ``backward`` and before ``optimizer.step``.
    A parameter that got no gradient on this rank counts as a zero gradient."""
    dense = [p for p in dense_parameters(model) if p.requires_grad]
    for p in dense:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if dense:
        _all_reduce_flat([p.grad for p in dense], dp_group)
    for module in model.modules():
        if isinstance(module, ExpertParallelExperts):
            module.reduce_replica_grads()
            grads = []
            for p in module.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            if module.expert_dp_group is not None:
                _all_reduce_flat(grads, module.expert_dp_group)
    if average:
        scale = 1.0 / dist.get_world_size(dp_group)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)


@torch.no_grad()
def broadcast_dense_parameters(model: nn.Module, dp_group=None) -> None:
    """Copy the dense parameters and buffers of the group's first rank to every rank of
    ``dp_group`` (as DDP does at construction), so replicated weights start equal."""
    group = dp_group if dp_group is not None else dist.group.WORLD
    src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
    expert_buffers = {id(b) for m in model.modules() if isinstance(m, ExpertParallelExperts) for b in m.buffers()}
    for t in dense_parameters(model) + [b for b in model.buffers() if id(b) not in expert_buffers]:
        dist.broadcast(t.data, src=src, group=group)
