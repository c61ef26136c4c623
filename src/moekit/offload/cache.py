"""Which expert sits in which GPU slot: the bookkeeping of the expert cache (pure Python).

A fixed pool of ``num_slots`` slots holds experts keyed by ``(layer, expert)``. The cache
decides hits and victims; copying weights is the engine's job (:mod:`moekit.offload.engine`).

Layers run in a cycle, and a global LRU over a cyclic scan larger than the cache evicts exactly
the entries needed next (at batch 8 every layer needs most of its experts, and a global LRU
then hits nothing). So the pool is shared, but each layer has a *quota* of
``num_slots // num_layers`` slots: a layer at its quota evicts only its own experts (and
streams through its own slots when one call needs more experts than that); a layer below its
quota takes a slot from a layer above its quota. With ``num_layers=1`` this is a plain global
cache. Within the candidates, the policy picks the victim:

- ``"lru"``: the least recently used expert (mixtral-offloading's policy, per layer);
- ``"lfu"``: the expert used least often over the whole run, ties broken by least recent use.
  Frequencies are kept for evicted experts too, so an expert that is popular over time wins its
  slot back (expert popularity is stable in MoE models, unlike page access).

Experts the current computation still needs, or whose copy is in flight for the next layer, are
*protected*: they are never chosen as victims.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["POLICIES", "ExpertCache"]

POLICIES = ("lru", "lfu")

Key = tuple[int, int]  # (layer, expert)


class ExpertCache:
    """Slot assignment for ``num_slots`` GPU expert slots under ``policy``.

    ``lookup(key)`` -> slot or None; ``use(key)`` records one use (recency and frequency);
    ``insert(key, protected)`` -> ``(slot, evicted_key or None)``, or None when every slot is
    protected.
    """

    def __init__(self, num_slots: int, policy: str = "lru", num_layers: int = 1):
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots: expected a positive integer, got {num_slots!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected a positive integer, got {num_layers!r}")
        self.num_slots = num_slots
        self.policy = policy
        self.quota = max(1, num_slots // num_layers)
        self._slot_of: OrderedDict[Key, int] = OrderedDict()  # resident keys, least recent first
        self._free = list(range(num_slots - 1, -1, -1))
        self._freq: dict[Key, int] = {}
        self._per_layer: dict[int, int] = {}

    def __contains__(self, key: Key) -> bool:
        return key in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def lookup(self, key: Key) -> int | None:
        return self._slot_of.get(key)

    def resident(self) -> list[Key]:
        """Resident keys, least recently used first."""
        return list(self._slot_of)

    def use(self, key: Key) -> None:
        """Record one use of ``key`` (resident or not: frequencies count every activation)."""
        self._freq[key] = self._freq.get(key, 0) + 1
        if key in self._slot_of:
            self._slot_of.move_to_end(key)

    def victim(self, layer: int, protected: set[Key] | frozenset[Key] = frozenset(),
               borrow: bool = False) -> Key | None:
        """The key ``insert`` would evict now for an expert of ``layer`` (None if a slot is
        free, or if every candidate is protected). ``borrow``: ignore the quota (any
        unprotected key; for a layer call that needs more experts than its quota)."""
        if self._free:
            return None
        if borrow:
            candidates = [k for k in self._slot_of if k not in protected]
        elif self._per_layer.get(layer, 0) >= self.quota:  # at its quota: only its own experts
            candidates = [k for k in self._slot_of if k[0] == layer and k not in protected]
        else:  # below its quota: from layers above theirs, else from anyone
            unprotected = [k for k in self._slot_of if k not in protected]
            candidates = [k for k in unprotected if self._per_layer[k[0]] > self.quota] or unprotected
        if not candidates:  # (least recent first)
            return None
        if self.policy == "lru":
            return candidates[0]
        return min(candidates, key=lambda k: self._freq.get(k, 0))  # min is stable: LRU among ties

    def insert(self, key: Key, protected: set[Key] | frozenset[Key] = frozenset(),
               borrow: bool = False, recent: bool = True) -> tuple[int, Key | None] | None:
        """Give ``key`` a slot (evicting a victim if needed); None if no slot may be taken.
        The new key counts as most recently used, or with ``recent=False`` (a prefetch, not a
        use) as least recently used: a wrong guess is then the next victim instead of pushing
        out experts that were used. ``borrow``: see :meth:`victim`."""
        if key in self._slot_of:
            raise ValueError(f"key: {key} is already resident in slot {self._slot_of[key]}")
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            evicted = self.victim(key[0], protected, borrow)
            if evicted is None:
                return None
            slot = self._slot_of.pop(evicted)
            self._per_layer[evicted[0]] -= 1
        self._slot_of[key] = slot
        if not recent:
            self._slot_of.move_to_end(key, last=False)
        self._per_layer[key[0]] = self._per_layer.get(key[0], 0) + 1
        return slot, evicted

    def exchange(self, key: Key, slot: int, protected: set[Key] | frozenset[Key] = frozenset(),
                 borrow: bool = False) -> tuple[int, Key | None] | None:
        """Admit ``key`` with the weights already in ``slot``, a slot from outside the cache
        (a staging slot, :mod:`moekit.offload.staging`): the victim :meth:`insert` would take
        leaves, and its slot (or a free one) leaves the cache in exchange. Returns ``(slot that
        left, evicted key or None)``, or None (nothing changed) when no slot may be taken. The
        key counts as most recently used."""
        if key in self._slot_of:
            raise ValueError(f"key: {key} is already resident in slot {self._slot_of[key]}")
        if slot in self._slot_of.values() or slot in self._free:
            raise ValueError(f"slot: {slot} already belongs to the cache")
        placed = self.insert(key, protected, borrow)
        if placed is None:
            return None
        left, evicted = placed
        self._slot_of[key] = slot
        return left, evicted
