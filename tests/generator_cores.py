"""Helpers for tests that run a GeneratorCore in-process."""

from __future__ import annotations

import time

from serve_app.generator import GeneratorCore


def wait_for_boot(core: GeneratorCore, timeout: float = 300) -> str:
    """The state a core's boot (load, compile every bucket, on its own thread) ends in:
    "ready" or "error"."""
    deadline = time.monotonic() + timeout
    while core.state == "initializing":
        assert time.monotonic() < deadline, f"{core.name} still booting after {timeout} s"
        time.sleep(0.1)
    return core.state


def wait_until_ready(core: GeneratorCore, timeout: float = 300) -> None:
    """Fails at once if the boot failed, with its error."""
    assert wait_for_boot(core, timeout) == "ready", core.error
