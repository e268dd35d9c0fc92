"""A consistent hash ring with bounded load: which member a key goes to.

Each member (a replica's name) owns `POINTS` points on a ring of 64-bit
hashes; a key goes to the member of the first point at or after its own hash.
Removing a member removes only its points, so only the keys it owned move (to
the next member along the ring); every other key keeps its member.

Bounded load (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with
Bounded Loads"): a member that already carries more than `FACTOR` times the
average in flight, and more than `FLOOR` requests, takes no new key; the key
goes on to the next member along the ring. A member that cannot take requests
at all (`usable` false) is passed over the same way.

Pure: names, loads and flags in, an index out. The hashes are blake2b, not
Python's `hash` (salted per process), so every process of one router (its
proxy workers) builds the same ring from the same names.
"""
from __future__ import annotations

from bisect import bisect_left
from hashlib import blake2b
from typing import Optional, Sequence

#: Points per member: enough that two members split keys within a few percent.
POINTS = 160
#: A member above this many times the average in flight (and above FLOOR) takes no new key.
FACTOR = 1.25
FLOOR = 8


def key_hash(data: bytes) -> int:
    """A key's place on the ring (64 bits, the same in every process)."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


class Ring:
    """The ring of one set of member names, in the order given (indexes are into that order)."""

    __slots__ = ("size", "_points", "_owners")

    def __init__(self, names: Sequence[str], points: int = POINTS):
        placed = sorted((key_hash(f"{name}#{i}".encode()), m) for m, name in enumerate(names) for i in range(points))
        self.size = len(names)
        self._points = [p for p, _ in placed]
        self._owners = [m for _, m in placed]

    def walk(self, key: int) -> list[int]:
        """Every member once, in ring order from `key`: the owner first, then the ones its keys move to."""
        seen: list[int] = []
        points = len(self._points)
        if not points:
            return seen
        start = bisect_left(self._points, key)
        for i in range(points):
            m = self._owners[(start + i) % points]
            if m not in seen:
                seen.append(m)
                if len(seen) == self.size:
                    break
        return seen

    def owner(self, key: int) -> Optional[int]:
        """The member `key` belongs to when every member can take it."""
        if not self._points:
            return None
        i = bisect_left(self._points, key)
        return self._owners[i if i < len(self._points) else 0]

    def choose(self, key: int, loads: Sequence[int], usable: Sequence[bool]) -> tuple[Optional[int], bool]:
        """(the member `key` goes to now, or None when no member is usable; whether it is the key's
        owner): the first usable member along the ring that is not above the bound (`loads[m]` in
        flight on member m)."""
        count = 0
        total = 0
        for m in range(self.size):
            if usable[m]:
                count += 1
                total += loads[m]
        if not count:
            return None, False
        bound = max(FACTOR * total / count, FLOOR)
        owner = self.owner(key)
        if owner is not None and usable[owner] and loads[owner] <= bound:
            return owner, True  # the usual case: no walk
        for m in self.walk(key):
            if usable[m] and loads[m] <= bound:
                return m, False
        return None, False  # unreachable: the least loaded usable member is never above the bound
