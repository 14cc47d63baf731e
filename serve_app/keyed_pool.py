"""A thread pool that runs tasks with the same key one after another.

The generator finishes bar-mode chunks here (loudness matching takes milliseconds per
bar, up to hundreds for a 50 s chunk): off the step loop, so no session's chunk holds up
the next step of every session, and in parallel across sessions, so one session's long
chunk does not hold up another's. A session's chunks must still be finished in order
(each one's gain ramps from the last), hence the key.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Hashable
from typing import Any


class KeyedPool:
    def __init__(self, workers: int, name: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._last: dict[Hashable, concurrent.futures.Future] = {}

    def submit(self, key: Hashable, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Runs `fn` once every task submitted before it under `key` has finished."""
        with self._lock:
            before = self._last.get(key)
            future = self._pool.submit(_after, before, fn)
            self._last[key] = future
        future.add_done_callback(lambda done: self._forget(key, done))
        return future

    def _forget(self, key: Hashable, done: concurrent.futures.Future) -> None:
        with self._lock:
            if self._last.get(key) is done:
                del self._last[key]

    def shutdown(self) -> None:
        """Drops the tasks not started; the ones running finish on their own."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _after(before: concurrent.futures.Future | None, fn: Callable[[], Any]) -> Any:
    # The pool takes tasks first in, first out, so `before` has already been taken by a
    # worker (or is done) when this runs: waiting for it cannot deadlock the pool.
    if before is not None:
        concurrent.futures.wait([before])
    return fn()
