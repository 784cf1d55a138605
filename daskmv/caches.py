"""Per-process caches: least recently used dropped beyond a budget, safe across threads and forks.

A worker keeps what its partitions read again and again: open arrays (:mod:`daskmv.arrays`), rows read
through array references (a pair manifest names each image once per pair) and what ops derive from them
(the matcher's operands of an image). Each is a :class:`ProcessCache`; a forked child starts with all of them
empty and with fresh locks, since a lock held by another thread at the fork would never be released there.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

V = TypeVar("V")

_ALL: weakref.WeakSet[ProcessCache[Any]] = weakref.WeakSet()


class ProcessCache(Generic[V]):
    """Values by key, at most ``budget`` in total ``size`` (1 per value by default: a count), least recently
    used dropped first. A value larger than the budget is returned but not kept."""

    def __init__(self, budget: int, size: Callable[[V], int] = lambda value: 1) -> None:
        self.budget, self.size = budget, size
        self._reset()
        _ALL.add(self)

    def _reset(self) -> None:
        self.lock = threading.Lock()
        self.values: OrderedDict[Hashable, V] = OrderedDict()
        self.total = 0
        self.pid = os.getpid()

    def _own(self) -> threading.Lock:
        """The lock, after emptying the cache in a forked child that ``register_at_fork`` did not reach."""
        if self.pid != os.getpid():
            self._reset()
        return self.lock

    def get(self, key: Hashable) -> V | None:
        """The value kept for ``key`` (now the most recently used), or None."""
        with self._own():
            value = self.values.get(key)
            if value is not None:
                self.values.move_to_end(key)
            return value

    def put(self, key: Hashable, value: V) -> V:
        """Keep ``value`` for ``key`` unless one is kept already (two threads made it at once: the first
        stays); return the kept one."""
        with self._own():
            kept = self.values.get(key)
            if kept is not None:
                return kept
            size = self.size(value)
            if size > self.budget:
                return value
            self.values[key] = value
            self.total += size
            while self.total > self.budget:
                self.total -= self.size(self.values.popitem(last=False)[1])
            return value

    def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value for ``key``, made (outside the lock: making may read files) and kept when missing."""
        found = self.get(key)
        return found if found is not None else self.put(key, make())

    def drop(self, which: Callable[[Hashable], bool] | None = None) -> None:
        """Forget the values whose key ``which`` accepts (all of them when None)."""
        with self._own():
            for key in [k for k in self.values if which is None or which(k)]:
                self.total -= self.size(self.values.pop(key))


def _after_fork() -> None:
    for cache in list(_ALL):
        cache._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
