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

    Shaped like the deque it replaces (append, first, popleft, remove, len), so
    a queue without classes pays one list index per operation."""

    __slots__ = ("_lanes", "_size")

    def __init__(self) -> None:
        self._lanes: tuple[deque[T], deque[T], deque[T]] = (deque(), deque(), deque())
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[T]:
        for lane in self._lanes:
            yield from lane

    def append(self, item: T, klass: int = NORMAL) -> None:
        self._lanes[klass].append(item)
        self._size += 1

    def first(self) -> T:
        for lane in self._lanes:
            if lane:
                return lane[0]
        raise IndexError("empty queue")

    def popleft(self) -> T:
        for lane in self._lanes:
            if lane:
                self._size -= 1
                return lane.popleft()
        raise IndexError("empty queue")

    def remove(self, item: T) -> None:
        """Take `item` out wherever it waits; ValueError if it does not."""
        for lane in self._lanes:
            try:
                lane.remove(item)
            except ValueError:
                continue
            self._size -= 1
            return
        raise ValueError("not queued")


def orders_by_priority(engine: str, engine_args: tuple[str, ...]) -> bool:
    """Whether an engine orders its queue by the request's `priority` field: vLLM started with
    ``--scheduling-policy priority``; no other engine is sent the field."""
    if engine != "vllm":
        return False
    for i, word in enumerate(engine_args):
        if word == "--scheduling-policy=priority" or (
                word == "--scheduling-policy" and i + 1 < len(engine_args) and engine_args[i + 1] == "priority"):
            return True
    return False
