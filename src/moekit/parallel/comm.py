"""Collectives of the expert-parallel layer: a differentiable all-to-all and group helpers.

Works with any ``torch.distributed`` backend that implements ``all_to_all_single`` (gloo on
CPU, NCCL on GPUs). Split sizes are Python lists of row counts, one per rank of the group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_to_all", "all_to_all_plain", "exchange_counts", "resolve_group", "group_rank_size"]


def resolve_group(group=None, mesh_dim: str | int | None = None):
    """The process group to use: ``group`` itself, a ``DeviceMesh`` dimension
    (``group`` a mesh and ``mesh_dim`` its name or index), or the default WORLD group."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: expected an initialised torch.distributed process group "
                         "(call torch.distributed.init_process_group first)")
    if group is not None and hasattr(group, "get_group"):  # a DeviceMesh
        if mesh_dim is None and group.ndim != 1:
            raise ValueError(f"mesh_dim: expected a dimension name of a {group.ndim}-D DeviceMesh, got None")
        return group.get_group(mesh_dim) if mesh_dim is not None else group.get_group()
    if mesh_dim is not None:
        raise ValueError("mesh_dim: only valid when group is a DeviceMesh")
    return group if group is not None else dist.group.WORLD


def group_rank_size(group) -> tuple[int, int]:
    """``(rank within group, group size)``."""
    return dist.get_rank(group), dist.get_world_size(group)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` on rows; its backward is the all-to-all with the splits swapped."""

    @staticmethod
    def forward(ctx, x_ND, out_splits, in_splits, group):
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        return all_to_all_plain(x_ND, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad_MD):
        out_splits, in_splits = ctx.splits
        return all_to_all_plain(grad_MD, in_splits, out_splits, ctx.group), None, None, None


def all_to_all_plain(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Non-differentiable :func:`all_to_all` (metadata, weights being moved)."""
    x_ND = x_ND.contiguous()
    out = x_ND.new_empty((sum(out_splits),) + tuple(x_ND.shape[1:]))
    dist.all_to_all_single(out, x_ND, out_splits, in_splits, group=group)
    return out


def all_to_all(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Send rows ``x_ND[sum(in_splits[:p]) : sum(in_splits[:p+1])]`` to rank ``p``; receive
    ``out_splits[q]`` rows from rank ``q``, stacked in rank order. Differentiable in ``x_ND``.

    x_ND: ``[N, ...]`` with ``N = sum(in_splits)``. Returns ``[sum(out_splits), ...]``.
    """
    if x_ND.shape[0] != sum(in_splits):
        raise ValueError(f"in_splits: expected to sum to x rows {x_ND.shape[0]}, got {sum(in_splits)}")
    return _AllToAll.apply(x_ND, list(out_splits), list(in_splits), group)


def exchange_counts(send_counts_PS: torch.Tensor, group) -> torch.Tensor:
    """Each rank tells each rank how many rows it will send to each of that rank's slots.

    send_counts_PS: int64 ``[P, S]``, rows this rank sends to slot ``s`` of rank ``p``.
    Returns int64 ``[P, S]``: rows rank ``q`` sends to this rank's slot ``s``.
    """
    num_ranks, num_slots = send_counts_PS.shape
    recv = torch.empty_like(send_counts_PS)
    dist.all_to_all_single(recv.view(-1), send_counts_PS.contiguous().view(-1),
                           [num_slots] * num_ranks, [num_slots] * num_ranks, group=group)
    return recv
