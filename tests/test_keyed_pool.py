"""The pool that finishes bar-mode chunks: each session's in order, sessions at once."""

from __future__ import annotations

import threading

from serve_app.keyed_pool import KeyedPool


def test_tasks_under_one_key_run_in_the_order_submitted():
    pool = KeyedPool(4, "test")
    release = threading.Event()
    ran: list[int] = []
    first = pool.submit("a", lambda: (release.wait(10), ran.append(0)))
    later = [pool.submit("a", lambda i=i: ran.append(i)) for i in range(1, 6)]
    assert not any(f.done() for f in later)  # four idle workers, yet they wait for the first
    release.set()
    for f in [first, *later]:
        f.result(10)
    assert ran == [0, 1, 2, 3, 4, 5]
    pool.shutdown()


def test_other_keys_do_not_wait_for_a_slow_key():
    pool = KeyedPool(2, "test")
    release = threading.Event()
    slow = pool.submit("a", lambda: release.wait(10))
    # this one sets what the slow task waits for: run one after the other, slow gives up
    pool.submit("b", release.set).result(10)
    assert slow.result(10) is True
    pool.shutdown()
