"""Applying a new placement to a running expert-parallel model: move expert weights (and
optimizer state) between the ranks of each EP group.

Only ``(rank, logical expert)`` pairs the new placement holds and the old one did not cross
the network (their number is :func:`moekit.metrics.moves`); a slot whose expert is already on
its rank is filled by a local copy. The transfer list is a pure function of the two
placements, so every rank derives the same one without talking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from moekit.parallel.comm import all_to_all_plain
from moekit.parallel.dispatch import slot_tables
from moekit.parallel.experts import ExpertParallelExperts

__all__ = ["Transfer", "MoveReport", "plan_transfers", "apply_plan"]


class Transfer(NamedTuple):
    """Copy logical ``expert`` from slot ``src_slot`` (local index) of ``src_rank`` to ``dst_rank``."""

    src_rank: int
    src_slot: int
    dst_rank: int
    expert: int


@dataclass
class MoveReport:
    """What applying a plan moved, summed over layers.

    moves: ``(layer, rank, expert)`` copies between ranks of one EP group (DESIGN.md "Moves").
    bytes_total: bytes sent by all ranks of the EP group (weights + optimizer state + grads).
    weight_bytes_total / state_bytes_total: that split into expert weights and the rest.
    bytes_sent / bytes_received: this rank's share.
    """

    moves: int = 0
    bytes_total: int = 0
    weight_bytes_total: int = 0
    state_bytes_total: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def __iadd__(self, other: "MoveReport") -> "MoveReport":
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


def plan_transfers(old_phy2log_R, new_phy2log_R, num_ranks: int) -> list[Transfer]:
    """The cross-rank copies that turn placement ``old`` into ``new`` (both ``[R]``).

    One transfer per ``(rank, expert)`` the new placement holds that the old did not, sorted by
    ``(dst_rank, expert)``. The source is one of the old holders, chosen round-robin by the
    destination rank so that copies of a hot expert are spread over its holders.
    """
    old = [int(e) for e in torch.as_tensor(old_phy2log_R, device="cpu").tolist()]
    new = [int(e) for e in torch.as_tensor(new_phy2log_R, device="cpu").tolist()]
    if len(old) != len(new) or len(old) % num_ranks:
        raise ValueError(f"new_phy2log: expected {len(old)} slots like the old placement (a multiple of "
                         f"{num_ranks} ranks), got {len(new)}")
    per = len(old) // num_ranks
    old_local = [old[p * per:(p + 1) * per] for p in range(num_ranks)]
    transfers = []
    for dst in range(num_ranks):
        for e in sorted(set(new[dst * per:(dst + 1) * per]) - set(old_local[dst])):
            holders = [p for p in range(num_ranks) if e in old_local[p]]
            if not holders:
                raise ValueError(f"old_phy2log: expert {e} has no slot, so it cannot be copied")
            src = holders[dst % len(holders)]
            transfers.append(Transfer(src, old_local[src].index(e), dst, e))
    return transfers


@torch.no_grad()
def _move_rows(t_SX: torch.Tensor, transfers: list[Transfer], old_local: list[int], new_local: list[int],
               rank: int, num_ranks: int, group) -> tuple[torch.Tensor, int, int]:
    """``t_SX`` rearranged for the new placement (rows = this rank's slots). Returns the new
    tensor and the number of rows this rank sent / received."""
    outgoing = [t for t in transfers if t.src_rank == rank]  # already in (dst, expert) order
    incoming = sorted((t for t in transfers if t.dst_rank == rank), key=lambda t: (t.src_rank, t.expert))
    send_splits = [sum(t.dst_rank == p for t in outgoing) for p in range(num_ranks)]
    recv_splits = [sum(t.src_rank == p for t in incoming) for p in range(num_ranks)]
    recv = all_to_all_plain(t_SX[[t.src_slot for t in outgoing]], recv_splits, send_splits, group)
    received = {t.expert: i for i, t in enumerate(incoming)}
    rows = []
    for e in new_local:
        rows.append(t_SX[old_local.index(e)] if e in old_local else recv[received[e]])
    return torch.stack(rows), len(outgoing), len(incoming)


def _state_tensors(param: nn.Parameter, optimizer) -> list[torch.Tensor]:
    """Tensors laid out like ``param`` that must follow its rows: optimizer state (Adam's
    moments, SGD's momentum) and the gradient."""
    out = []
    if optimizer is not None:
        out += [v for v in optimizer.state.get(param, {}).values()
                if torch.is_tensor(v) and v.shape == param.shape]
    if param.grad is not None:
        out.append(param.grad)
    return out


def _apply_layer(module: ExpertParallelExperts, new_phy2log_R, optimizer) -> MoveReport:
    new = torch.as_tensor(new_phy2log_R, device="cpu").detach().to(torch.int64)
    old = module.phy2log.detach().to("cpu")
    module.set_placement(new)  # validates before anything moves
    rank, num_ranks, per = module.rank, module.num_ranks, module.slots_per_rank
    transfers = plan_transfers(old, new, num_ranks)
    old_local = old[rank * per:(rank + 1) * per].tolist()
    new_local = new[rank * per:(rank + 1) * per].tolist()
    report = MoveReport(moves=len(transfers))
    for param in (module.local.w_in, module.local.w_out):
        for i, t in enumerate([param.data] + _state_tensors(param, optimizer)):
            moved, sent, received = _move_rows(t, transfers, old_local, new_local, rank, num_ranks, module.group)
            t.copy_(moved)
            row_bytes = t[0].numel() * t.element_size()
            report.bytes_sent += sent * row_bytes
            report.bytes_received += received * row_bytes
            total = len(transfers) * row_bytes
            report.bytes_total += total
            if i == 0:
                report.weight_bytes_total += total
            else:
                report.state_bytes_total += total
    return report


def apply_plan(model: nn.Module, phy2log, optimizer: torch.optim.Optimizer | None = None) -> MoveReport:
    """Switch every expert-parallel layer of ``model`` to a new placement, in place.

    phy2log: ``[L, R]`` (or a :class:`moekit.placement.Plan`, whose ``phy2log`` is used), one
    row per :class:`ExpertParallelExperts` in ``model.modules()`` order; ``R`` must equal the
    current number of slots. optimizer: its per-parameter state tensors shaped like the expert
    weights (Adam's ``exp_avg``/``exp_avg_sq``) move with the weights, so training continues
    exactly as if each expert had never moved. Collective over every EP group. Call between
    optimizer steps.
    """
    phy2log = getattr(phy2log, "phy2log", phy2log)
    layers = [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
    p2l = torch.as_tensor(phy2log, device="cpu")
    if p2l.ndim == 1:
        p2l = p2l[None]
    if p2l.ndim != 2 or p2l.shape[0] != len(layers):
        raise ValueError(f"phy2log: expected [L={len(layers)}, R] (one row per expert-parallel layer), "
                         f"got shape {tuple(p2l.shape)}")
    for module, row in zip(layers, p2l):  # check every layer before anything moves
        slot_tables(row, module.cfg.num_experts, module.num_ranks)
        if row.shape[0] != module.phy2log.shape[0]:
            raise ValueError(f"phy2log: expected R={module.phy2log.shape[0]} slots per layer, got {row.shape[0]}")
    report = MoveReport()
    for module, row in zip(layers, p2l):
        report += _apply_layer(module, row, optimizer)
    return report
