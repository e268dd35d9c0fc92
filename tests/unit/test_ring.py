"""The consistent hash ring with bounded load (router/server/fleet/ring.py): stable, spread, bounded."""
from __future__ import annotations

import subprocess
import sys

from router.server.fleet.ring import FLOOR, Ring, key_hash

KEYS = [key_hash(f"session-{i}".encode()) for i in range(2000)]


def owners(ring: Ring, names: list[str]) -> dict[int, str]:
    return {k: names[ring.choose(k, [0] * len(names), [True] * len(names))[0]] for k in KEYS}  # type: ignore[index]


def test_keys_spread_over_every_member() -> None:
    for names in (["a", "b"], ["a", "b", "c", "d"]):
        got = owners(Ring(names), names)
        for name in names:
            share = sum(1 for v in got.values() if v == name) / len(KEYS)
            assert abs(share - 1 / len(names)) < 0.1, (name, share)


def test_a_member_that_leaves_moves_only_its_own_keys() -> None:
    names = ["a", "b", "c"]
    before = owners(Ring(names), names)
    after = owners(Ring(["a", "c"]), ["a", "c"])
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved and moved == {k for k in KEYS if before[k] == "b"}
    # and one that joins takes keys only for itself
    joined = owners(Ring(names + ["d"]), names + ["d"])
    assert {k for k in KEYS if joined[k] != before[k]} == {k for k in KEYS if joined[k] == "d"}


def test_the_ring_is_the_same_in_another_process() -> None:
    """Proxy workers are other processes: Python's salted hash would give each its own ring."""
    code = ("from router.server.fleet.ring import Ring, key_hash;"
            "print([Ring(['a','b','c']).owner(key_hash(str(i).encode())) for i in range(50)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PYTHONPATH": ":".join(sys.path)}).stdout
    here = Ring(["a", "b", "c"])
    assert out.strip() == str([here.owner(key_hash(str(i).encode())) for i in range(50)])


def test_an_unusable_member_is_passed_over_to_the_next_on_the_ring() -> None:
    names = ["a", "b", "c"]
    ring = Ring(names)
    for k in KEYS[:200]:
        walk = ring.walk(k)
        assert walk[0] == ring.owner(k) and sorted(walk) == [0, 1, 2]
        usable = [True] * 3
        usable[walk[0]] = False
        assert ring.choose(k, [0, 0, 0], usable) == (walk[1], False)
        usable[walk[1]] = False
        assert ring.choose(k, [0, 0, 0], usable)[0] == walk[2]
        assert ring.choose(k, [0, 0, 0], [False] * 3)[0] is None


def test_bounded_load_moves_keys_off_a_member_above_the_bound() -> None:
    ring = Ring(["a", "b"])
    key = next(k for k in KEYS if ring.owner(k) == 0)
    # at or under the floor of 8, skew does not matter: the key stays
    assert ring.choose(key, [FLOOR, 0], [True, True]) == (0, True)
    # 9 against 0: above 8 and above 1.25 x the average (4.5): moved to the next member
    assert ring.choose(key, [FLOOR + 1, 0], [True, True]) == (1, False)
    # 20 against 12: average 16, bound 20: stays; 21 against 12: bound 20.6: moved
    assert ring.choose(key, [20, 12], [True, True])[0] == 0
    assert ring.choose(key, [21, 12], [True, True])[0] == 1
    # an unusable member's load does not count in the average
    assert ring.choose(key, [FLOOR + 1, 100], [True, False])[0] == 0


def test_under_skew_bounded_load_keeps_every_member_near_the_average() -> None:
    """Every key hot on one member: requests pile up there to the bound, then spill to the next."""
    names = ["a", "b", "c"]
    ring = Ring(names)
    hot = [k for k in KEYS if ring.owner(k) == 0][:300]
    loads = [0, 0, 0]
    for k in hot:
        m, _ = ring.choose(k, loads, [True] * 3)
        assert m is not None
        loads[m] += 1
    assert sum(loads) == 300
    assert max(loads) <= 1.25 * (300 / 3) + 1
    assert all(n > 0 for n in loads)


def test_an_empty_ring_owns_nothing() -> None:
    ring = Ring([])
    assert ring.owner(1) is None and ring.walk(1) == [] and ring.choose(1, [], []) == (None, False)
