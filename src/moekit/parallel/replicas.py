"""Gradient reduction of replicated experts, planned once per placement.

A logical expert with several physical slots (replicas) gets a share of its tokens on each
slot, so each replica's gradient is a partial sum; replicas must step with the total. Which
slots to sum depends only on the placement, so the plan is made on the host when the
placement is set, and the reduction then needs no device-to-host sync and no staging buffer:

- replicas on the same rank are summed locally into the first one (no communication);
- an expert whose replicas sit on several ranks is summed by an all-reduce of that first
  slot's gradient, in place (a slot's gradient is one contiguous ``[H, D]`` / ``[D, F]``
  block), then copied to its other local replicas. A rank that holds none of its replicas
  joins with zeros (only possible with more than 2 ranks).

One all-reduce per such expert and weight, instead of one bucket: packing the slots into a
bucket and unpacking it costs three extra passes over the same bytes, as much as the
all-reduce itself over NVLink for large experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["ReplicaSync", "replica_sync"]


class ReplicaSync:
    """groups: one entry per replicated expert that this rank must take part in, as
    ``(local slots of the expert, whether its replicas span several ranks)``; the cross-rank
    experts come first, in one order shared by every rank (so the all-reduces match), with
    an empty slot list on a rank that holds none of them."""

    def __init__(self, groups: list[tuple[list[int], bool]]):
        self.groups = groups

    @property
    def num_all_reduces(self) -> int:
        """All-reduces per weight tensor (0: the reduction is local)."""
        return sum(cross for _, cross in self.groups)

    @torch.no_grad()
    def reduce(self, weights: tuple[torch.Tensor, ...], group) -> None:
        """Replace the gradient of every replica in ``weights`` (``[S, ...]`` parameters) by
        the sum over all replicas of its expert. Collective over ``group`` when some expert
        has replicas on several ranks (every rank calls it, with or without such slots)."""
        if not self.groups:
            return
        for w in weights:
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            grad = w.grad
            for slots, cross in self.groups:
                if slots:
                    head = grad[slots[0]]
                    for s in slots[1:]:
                        head.add_(grad[s])
                else:
                    head = grad.new_zeros(grad.shape[1:])
                if cross:
                    dist.all_reduce(head, group=group)
                for s in slots[1:]:
                    grad[s].copy_(head)


def replica_sync(phy2log_R: torch.Tensor, rank: int, num_ranks: int) -> ReplicaSync:
    """The :class:`ReplicaSync` of ``rank`` for placement ``phy2log_R`` ``[R]`` (CPU)."""
    p2l = [int(e) for e in phy2log_R.tolist()]
    per = len(p2l) // num_ranks
    ranks_of: dict[int, set[int]] = {}
    count: dict[int, int] = {}
    for slot, e in enumerate(p2l):
        ranks_of.setdefault(e, set()).add(slot // per)
        count[e] = count.get(e, 0) + 1
    mine = p2l[rank * per:(rank + 1) * per]
    local_slots: dict[int, list[int]] = {}
    for s, e in enumerate(mine):
        local_slots.setdefault(e, []).append(s)
    cross = sorted(e for e, r in ranks_of.items() if len(r) > 1)
    local_only = sorted(e for e, slots in local_slots.items() if count[e] > 1 and len(ranks_of[e]) == 1)
    groups = [(local_slots.get(e, []), True) for e in cross] + [(local_slots[e], False) for e in local_only]
    return ReplicaSync(groups)
