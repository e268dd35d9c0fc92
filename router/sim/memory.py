"""What a simulated engine still holds across its sleep tiers, and so whether its answers are right.

A real engine woken the wrong way answers with wrong text, not with an error,
so a router bug there goes unseen until a user reads the output. The simulator
keeps this state so the router's tests can see it:

- vLLM level 0 pauses only: nothing is freed, nothing is lost.
- vLLM level 1 offloads the weights to host RAM; ``/wake_up`` copies them back.
- vLLM level 2 discards them: ``/wake_up`` brings back empty memory, and the
  engine answers garbage until ``/collective_rpc {"method": "reload_weights"}``
  reads them again (documented wake: ``wake_up?tags=weights``, ``reload_weights``,
  ``wake_up?tags=kv_cache``).
- SGLang's ``/release_memory_occupation`` frees the weights only with
  ``--enable-memory-saver`` (otherwise its saver is a no-op and nothing is lost).
  With ``--enable-weights-cpu-backup`` they wait in host RAM and come back on
  resume; without it they are gone, and the radix cache still indexes KV of the
  old memory: answers are garbage until ``/update_weights_from_disk`` and
  ``/flush_cache`` have both run (sglang#6367, #19442, PR #10873).
- A generation run on lost weights leaves its garbage KV in the prefix cache, so
  reloading the weights afterwards is not enough: the cache must be reset too
  (vLLM ``/reset_prefix_cache``, SGLang ``/flush_cache``).

This module is the state and its transitions only; the routes (vllm_api.py,
sglang_api.py) decide which call does what and how long it takes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

#: The parts vLLM's /wake_up restores; the engine runs again once both are back.
WAKE_TAGS = frozenset({"weights", "kv_cache"})


@dataclass
class Memory:
    """One engine's sleep state: asleep or not, how deep, what is back, what is lost."""

    asleep: bool = False
    #: The sleep level while asleep (0 when awake): vLLM's 0, 1 or 2; SGLang 1 (kept) or 2 (lost).
    level: int = 0
    #: Parts already woken by ``/wake_up?tags=`` while still asleep.
    woken: set[str] = field(default_factory=set)
    #: The weights were discarded and not read again: generations produce garbage.
    weights_lost: bool = False
    #: The prefix cache holds KV computed from lost weights: generations that hit it produce garbage.
    cache_stale: bool = False

    @property
    def answers_right(self) -> bool:
        return not (self.weights_lost or self.cache_stale)

    @property
    def weights_mapped(self) -> bool:
        """Whether the weights' memory is there to load into (awake, or woken with ``tags=weights``)."""
        return not self.asleep or "weights" in self.woken

    def sleep(self, level: int) -> bool:
        """Sleep at `level`, or deepen a lighter sleep to it (never lighten one).

        Returns whether this call moves the weights to host RAM (a level-1 sleep from awake
        or from level 0), which is what takes time.
        """
        before = self.level if self.asleep else 0
        level = max(level, before)
        self.asleep, self.level, self.woken = True, level, set()
        if level >= 2:
            self.weights_lost = True
        return level == 1 and before < 1

    def release(self, tags: Optional[Iterable[str]], frees_weights: bool) -> None:
        """SGLang's release: level 2 where the weights are freed without a backup, else 1."""
        lose = frees_weights and (tags is None or "weights" in tags)
        self.asleep, self.woken = True, set()
        self.level = 2 if lose or self.level == 2 else 1
        if lose:
            self.weights_lost = self.cache_stale = True

    def restores(self, tags: Optional[Iterable[str]]) -> bool:
        """Whether waking `tags` (None: all) copies offloaded weights back from host RAM, which takes time."""
        wanted = WAKE_TAGS if tags is None else set(tags)
        return self.asleep and self.level == 1 and "weights" in wanted and "weights" not in self.woken

    def wake(self, tags: Optional[Iterable[str]]) -> bool:
        """Wake `tags` (None: all); True once awake (weights and KV cache both back)."""
        self.woken |= WAKE_TAGS if tags is None else set(tags)
        if self.woken >= WAKE_TAGS:
            self.resume()
        return not self.asleep

    def resume(self) -> None:
        """Awake: whatever was lost stays lost."""
        self.asleep, self.level, self.woken = False, 0, set()

    def reload(self) -> None:
        """The weights read again from disk (the caller checked `weights_mapped`)."""
        self.weights_lost = False

    def reset_cache(self) -> None:
        self.cache_stale = False

    def generated(self) -> None:
        """A generation ran: on lost weights it leaves garbage KV in the prefix cache."""
        if self.weights_lost:
            self.cache_stale = True
