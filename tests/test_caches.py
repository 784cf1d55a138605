"""The per-process caches workers keep (open arrays, referenced rows, the matcher's operands)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from daskmv.caches import ProcessCache


def test_least_recently_used_values_go_first_within_a_count_or_a_byte_budget():
    counted: ProcessCache[str] = ProcessCache(2)
    counted.put("a", "A")
    counted.put("b", "B")
    assert counted.get("a") == "A"  # now the most recently used
    counted.put("c", "C")
    assert counted.get("b") is None and counted.get("a") == "A" and counted.get("c") == "C"

    sized: ProcessCache[np.ndarray] = ProcessCache(1000, size=lambda a: a.nbytes)
    for k in range(5):
        sized.put(k, np.zeros(300, np.uint8))
    assert sized.total == 900 and [k for k in range(5) if sized.get(k) is not None] == [2, 3, 4]
    big = np.zeros(2000, np.uint8)
    assert sized.put("big", big) is big and sized.get("big") is None  # larger than the budget: not kept
    sized.drop(lambda key: key == 3)
    assert sized.get(3) is None and sized.total == 600


def test_a_value_made_twice_at_once_keeps_the_first_and_each_key_is_made_once():
    cache: ProcessCache[object] = ProcessCache(10)
    first = cache.put("k", object())
    assert cache.put("k", object()) is first
    made = []
    assert cache.get_or_make("m", lambda: made.append(1) or "M") == "M"
    assert cache.get_or_make("m", lambda: made.append(1) or "other") == "M" and made == [1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_empty_even_if_a_thread_held_the_lock():
    """A lock held by another thread when the process forks would never be released in the child."""
    cache: ProcessCache[str] = ProcessCache(10)
    cache.put("a", "A")
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cache.lock:
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait(10)
    try:
        pid = os.fork()
        if pid == 0:  # the child: empty, and its lock is free
            ok = cache.get("a") is None and cache.put("b", "B") == "B" and cache.get("b") == "B"
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        thread.join()
    assert os.waitstatus_to_exitcode(status) == 0
    assert cache.get("a") == "A"  # the parent keeps its values


def test_every_access_empties_a_cache_inherited_from_another_process():
    """A child the fork hook did not reach (its pid differs from the cache's) starts empty on whatever it
    calls first: get, put or drop."""
    for first in ("get", "put", "drop"):
        cache: ProcessCache[str] = ProcessCache(10)
        cache.put("a", "A")
        cache.pid = -1  # as in a child the fork hook did not reach
        if first == "get":
            assert cache.get("a") is None
        elif first == "put":
            assert cache.put("a", "new") == "new"  # not the parent's "A"
        else:
            cache.drop(lambda key: False)
        assert cache.pid == os.getpid()
        assert cache.get("a") == ("new" if first == "put" else None)
        assert cache.total == (1 if first == "put" else 0)
