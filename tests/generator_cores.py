"""Helpers for tests that run a GeneratorCore in-process."""

from __future__ import annotations

import time

from serve_app.generator import GeneratorCore


def wait_until_ready(core: GeneratorCore, timeout: float = 300) -> None:
    """A core boots (loads, compiles every bucket) on its own thread; fails at once if
    the boot failed, with its error."""
    deadline = time.monotonic() + timeout
    while core.state != "ready":
        assert core.state != "error", core.error
        assert time.monotonic() < deadline, f"{core.name} not ready after {timeout} s"
        time.sleep(0.1)
