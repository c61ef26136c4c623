"""Gradient reduction of replicated experts, planned once per placement.

A logical expert with several physical slots (replicas) gets a share of its tokens on each
slot, so each replica's gradient is a partial sum; replicas must step with the total. The
index lists for that depend only on the placement, so they are built on the host when the
placement is set, and the reduction itself then needs no device-to-host sync:

- replicas on the same rank are summed locally (no communication);
- experts whose replicas sit on several ranks are summed by one all-reduce over the EP
  group, of only those experts' rows (not of every replicated expert).

Shapes: ``R`` slots in the group, ``S = R / P`` per rank, ``C`` experts with replicas on
more than one rank, ``L`` experts replicated on this rank only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["ReplicaSync", "replica_sync"]


class ReplicaSync:
    """slots: local slots holding a replicated expert (host list). rows: the buffer row of
    each of them: rows ``[0, C)`` are the cross-rank experts in one order shared by all
    ranks (zero where this rank holds none of them), rows ``C + i`` this rank's
    replicated-here-only experts. num_cross: ``C``. num_rows: ``C + L``."""

    def __init__(self, slots: list[int], rows: list[int], num_cross: int, num_rows: int):
        self.slots, self.rows, self.num_cross, self.num_rows = slots, rows, num_cross, num_rows
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The index lists on ``device``, copied once (a copy per call would wait for the GPU)."""
        if device not in self._on_device:
            self._on_device[device] = (torch.tensor(self.slots, device=device), torch.tensor(self.rows, device=device))
        return self._on_device[device]

    @torch.no_grad()
    def reduce(self, weights: tuple[torch.Tensor, ...], group) -> None:
        """Replace the gradient of every replica in ``weights`` (``[S, ...]`` parameters) by
        the sum over all replicas of its expert. Collective over ``group`` when some expert
        has replicas on several ranks (every rank calls it, with or without such slots)."""
        if self.num_rows == 0:
            return
        for w in weights:
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            if not self.slots and self.num_cross:  # holds no replica, joins the all-reduce
                buf = w.grad.new_zeros((self.num_cross,) + tuple(w.shape[1:]))
                dist.all_reduce(buf, group=group)
                continue
            slots, rows = self._indices(w.device)
            buf = w.grad.new_zeros((self.num_rows,) + tuple(w.shape[1:]))
            buf.index_add_(0, rows, w.grad.index_select(0, slots))
            if self.num_cross:
                dist.all_reduce(buf[:self.num_cross], group=group)  # a contiguous prefix: in place
            w.grad.index_copy_(0, slots, buf.index_select(0, rows))


def replica_sync(phy2log_R: torch.Tensor, rank: int, num_ranks: int) -> ReplicaSync:
    """The :class:`ReplicaSync` of ``rank`` for placement ``phy2log_R`` ``[R]`` (CPU)."""
    p2l = phy2log_R.tolist()
    per = len(p2l) // num_ranks
    ranks_of: dict[int, set[int]] = {}
    count: dict[int, int] = {}
    for slot, e in enumerate(p2l):
        ranks_of.setdefault(e, set()).add(slot // per)
        count[e] = count.get(e, 0) + 1
    cross = sorted(e for e, r in ranks_of.items() if len(r) > 1)
    cross_row = {e: i for i, e in enumerate(cross)}
    mine = p2l[rank * per:(rank + 1) * per]
    local_only = sorted({e for e in mine if count[e] > 1 and e not in cross_row})
    local_row = {e: len(cross) + i for i, e in enumerate(local_only)}
    slots, rows = [], []
    for s, e in enumerate(mine):
        if count[e] > 1:
            slots.append(s)
            rows.append(cross_row[e] if e in cross_row else local_row[e])
    return ReplicaSync(slots, rows, len(cross), len(cross) + len(local_only))
