"""Which LoRA adapters one engine holds: loaded, being loaded, in use, and when each was last used.

A replica owns one `LoraSlots` (`Replica.loras`) and it changes only through
these methods: the adapter loader (router/server/fleet/adapters.py) marks loads
and unloads, a request marks its use (`begin`/`end`), and the replica itself
forgets what its engine lost (`lost`: a restart, or a level-2 wake that read
the weights again). Adapters the engine's own flags load at start are held
again after a restart, so `lost` keeps them.
"""
from __future__ import annotations

from typing import Iterable, Optional


class LoraSlots:
    """One engine's adapters, for routing (prefer a replica that holds one) and eviction (least
    recently used idle one)."""

    __slots__ = ("known", "at_start", "loaded", "loading", "busy")

    def __init__(self, known: Iterable[str] = (), at_start: Iterable[str] = ()) -> None:
        #: The adapters this engine may serve (its instance's `lora_adapters`).
        self.known = frozenset(known)
        #: Those its own flags load at start.
        self.at_start = frozenset(at_start)
        #: Loaded adapter -> when it was last used (monotonic seconds).
        self.loaded: dict[str, float] = dict.fromkeys(self.at_start, 0.0)
        #: Adapters whose load is under way.
        self.loading: set[str] = set()
        #: Adapter -> requests in flight for it (an adapter in use is never unloaded).
        self.busy: dict[str, int] = {}

    def reconfigure(self, known: Iterable[str], at_start: Iterable[str]) -> None:
        """A reload changed the instance's adapters: those still declared and held stay held."""
        self.known = frozenset(known)
        self.at_start = frozenset(at_start)
        self.loaded = {n: t for n, t in self.loaded.items() if n in self.known}

    def holds(self, name: str) -> bool:
        """Whether the adapter is loaded here or being loaded (a request for it should come here)."""
        return name in self.loaded or name in self.loading

    def begin(self, name: str, now: float) -> None:
        """A request for `name` is going to this engine (from before its load, so no other load evicts it)."""
        self.busy[name] = self.busy.get(name, 0) + 1
        if name in self.loaded:
            self.loaded[name] = now

    def end(self, name: str, now: float) -> None:
        left = self.busy.get(name, 0) - 1
        if left > 0:
            self.busy[name] = left
        else:
            self.busy.pop(name, None)
        if name in self.loaded:
            self.loaded[name] = now

    def count_remote(self, name: str, delta: int, now: float) -> None:
        """`delta` more requests for `name` in flight from a proxy worker (the controller's merged count)."""
        for _ in range(abs(delta)):
            (self.begin if delta > 0 else self.end)(name, now)

    def follow(self, loaded: Iterable[str], loading: Iterable[str]) -> None:
        """Take the controller's word whole (a proxy worker's copy, which never loads itself)."""
        self.loaded = {n: self.loaded.get(n, 0.0) for n in loaded}
        self.loading = set(loading)

    def load_started(self, name: str) -> None:
        self.loading.add(name)

    def load_ended(self, name: str, ok: bool, now: float) -> None:
        self.loading.discard(name)
        if ok:
            self.loaded[name] = now

    def unloaded(self, name: str) -> None:
        self.loaded.pop(name, None)

    def victim(self) -> Optional[str]:
        """The least recently used loaded adapter with no request in flight (None: all are in use)."""
        idle = [(used, name) for name, used in self.loaded.items() if not self.busy.get(name)]
        return min(idle)[1] if idle else None

    def lost(self) -> None:
        """The engine no longer holds what the router loaded (it restarted, or dropped its weights)."""
        self.loaded = {n: self.loaded.get(n, 0.0) for n in self.at_start}
