"""The staging area of a prefetch: device slots outside the expert cache (pure Python bookkeeping).

Without staging, a prefetched guess takes a cache slot at once and evicts a resident expert. When
the guess is wrong, nothing evicts it again until its layer comes round, and the expert it pushed
out must be copied back in full when a later step needs it (on the Mixtral-8x7B config: 6.4 ms per
expert, against at most ~1 ms that a right guess saves). With ``staging_slots > 0``
(:func:`moekit.offload.offload`) a guess is copied into a *staging* slot instead:

- a guess needed by its layer is *promoted*: its slot joins the cache and the cache's victim
  (the expert a demand copy of it would have evicted) leaves, its slot joining the staging area
  with its weights kept. So a right guess evicts exactly what its miss would have, and a
  wrong guess evicts nothing from the cache;
- a wrong guess stays staged until a later guess needs its slot (it is then *dropped*), and is
  used like a cached expert if some layer call needs it before that;
- an expert evicted by a promotion likewise stays staged (its weights are still in the slot)
  until a guess overwrites it: a hit if it is needed again before.

The staging slots are plain slot indices of the engine's slot tensors; which slot is staging
changes with every promotion (the slot of a promoted guess becomes a cache slot, the victim's
slot a staging one), so no weights are ever copied between slots.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["StagingArea"]

Key = tuple[int, int]  # (layer, expert)


class StagingArea:
    """Staging slots, each empty or holding one expert ``(layer, expert)``.

    ``lookup(key)`` -> slot or None; ``take(key, guard)`` -> ``(slot, dropped key or None)`` for
    a new guess (an empty slot, else the least recently staged expert not in ``guard``), or None;
    ``remove(key)`` -> its slot, which leaves the staging area (a promotion); ``add(slot, key)``
    -> a slot joins it, holding ``key`` (or empty with ``key=None``).
    """

    def __init__(self, slots: list[int]):
        if not slots or len(set(slots)) != len(slots) or any(not isinstance(s, int) or s < 0 for s in slots):
            raise ValueError(f"slots: expected distinct non-negative slot indices, got {slots!r}")
        self._slot_of: OrderedDict[Key, int] = OrderedDict()  # staged keys, least recently staged first
        self._empty: list[int] = list(reversed(slots))

    def __len__(self) -> int:
        """Number of staging slots (empty or not)."""
        return len(self._slot_of) + len(self._empty)

    def __contains__(self, key: Key) -> bool:
        return key in self._slot_of

    def lookup(self, key: Key) -> int | None:
        return self._slot_of.get(key)

    def staged(self) -> list[Key]:
        """Staged keys, least recently staged first."""
        return list(self._slot_of)

    def slots(self) -> set[int]:
        """Every staging slot index, empty or not."""
        return set(self._slot_of.values()) | set(self._empty)

    def take(self, key: Key, guard: set[Key] | frozenset[Key] = frozenset()) -> tuple[int, Key | None] | None:
        """A slot for the guess ``key``: an empty one, else the slot of the least recently
        staged key not in ``guard`` (that key is dropped). None when every staged key is guarded."""
        if key in self._slot_of:
            raise ValueError(f"key: {key} is already staged in slot {self._slot_of[key]}")
        dropped = None
        if self._empty:
            slot = self._empty.pop()
        else:
            dropped = next((k for k in self._slot_of if k not in guard), None)
            if dropped is None:
                return None
            slot = self._slot_of.pop(dropped)
        self._slot_of[key] = slot
        return slot, dropped

    def remove(self, key: Key) -> int:
        """Take ``key`` and its slot out of the staging area (the slot now belongs to the cache)."""
        if key not in self._slot_of:
            raise ValueError(f"key: {key} is not staged")
        return self._slot_of.pop(key)

    def add(self, slot: int, key: Key | None = None) -> None:
        """The slot ``slot`` joins the staging area, holding ``key`` (most recently staged) or
        empty (``key=None``)."""
        if slot in self.slots():
            raise ValueError(f"slot: {slot} is already a staging slot")
        if key is None:
            self._empty.append(slot)
        elif key in self._slot_of:
            raise ValueError(f"key: {key} is already staged in slot {self._slot_of[key]}")
        else:
            self._slot_of[key] = slot
