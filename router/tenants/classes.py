"""Priority classes and the wait queue that serves them: higher classes first, FIFO within a class.

A class is a small int, lower first (as vLLM's ``priority`` field), so it
crosses the workers' link as one number. A request's class is its key's; the
header ``x-kvrouter-priority`` may lower it, never raise it.
"""
from __future__ import annotations

from collections import deque
from typing import Generic, Iterator, Optional, TypeVar

T = TypeVar("T")

HIGH, NORMAL, LOW = 0, 1, 2
#: Config and header words -> class.
CLASSES = {"high": HIGH, "normal": NORMAL, "low": LOW}
NAMES = {v: k for k, v in CLASSES.items()}
#: The `priority` vLLM gets for each class under ``--scheduling-policy priority`` (lower runs first; a
#: request without the field counts as 0, so normal sends nothing).
VLLM_PRIORITY = {HIGH: -10, NORMAL: 0, LOW: 10}


def requested(key_class: int, header: Optional[bytes]) -> int:
    """The class of a request of a key of `key_class` that sent `header` (None: none): the header may
    only lower it; a word it does not know is ignored."""
    if header is None:
        return key_class
    asked = CLASSES.get(header.strip().lower().decode("latin-1"))
    return key_class if asked is None else max(key_class, asked)


class ClassQueue(Generic[T]):
    """Waiters in classes: `first` is the oldest of the highest class present.

    Shaped like the deque it replaces (append, first, popleft, remove, len); a hot
    path that only asks whether anyone waits reads `size` (an attribute, no call)."""

    __slots__ = ("_lanes", "size")

    def __init__(self) -> None:
        self._lanes: tuple[deque[T], deque[T], deque[T]] = (deque(), deque(), deque())
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def __iter__(self) -> Iterator[T]:
        for lane in self._lanes:
            yield from lane

    def append(self, item: T, klass: int = NORMAL) -> None:
        self._lanes[klass].append(item)
        self.size += 1

    def first(self) -> T:
        for lane in self._lanes:
            if lane:
                return lane[0]
        raise IndexError("empty queue")

    def popleft(self) -> T:
        for lane in self._lanes:
            if lane:
                self.size -= 1
                return lane.popleft()
        raise IndexError("empty queue")

    def remove(self, item: T) -> None:
        """Take `item` out wherever it waits; ValueError if it does not."""
        for lane in self._lanes:
            try:
                lane.remove(item)
            except ValueError:
                continue
            self.size -= 1
            return
        raise ValueError("not queued")

