"""Quiet, structured logging: `key=value` lines, WARNING by default (MRT_LOG_LEVEL).

Long work shows progress all the same: records of the `mrt_serve.progress` logger (a file
downloading, a model loading, each batch bucket compiling, a replica ready) are shown at
INFO unless the level is above WARNING. They come with a boot or a model switch, never
per request."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

PROGRESS_LOGGER = "mrt_serve.progress"
_NOISY = ("absl", "jax", "jax._src", "ray", "filelock", "urllib3", "httpx")


def configure(level: str | None = None) -> None:
    level = (level or os.environ.get("MRT_LOG_LEVEL", "WARNING")).upper()
    # The process's own stderr: in a Serve replica `sys.stderr` is Serve's redirect into
    # the replica's log file when RAY_SERVE_LOG_TO_STDERR=0 (scripts/serve sets it, to
    # keep Serve's line per request off the console), which would hide our warnings and
    # progress from `serve run` as well. Ray streams each worker's stderr to the driver.
    logging.basicConfig(
        level=level,
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
        stream=sys.__stderr__,
        force=True,
    )
    number = logging.getLevelName(level)
    logging.getLogger(PROGRESS_LOGGER).setLevel(logging.INFO if number <= logging.WARNING
                                                else number)
    for name in _NOISY:  # third-party INFO (absl logs every layer trace) stays hidden
        logging.getLogger(name).setLevel(max(logging.WARNING, number))


class BurstWarning:
    """One warning line for events that come in bursts: the first at once, the rest
    gathered and summed up in one line at most every `interval` seconds.

    An overloaded generator makes every session fall behind in the same step; a line
    each is dozens in one millisecond, saying one thing. The summary keeps what an
    operator acts on: how many, which (the first few), and the load at the time."""

    def __init__(self, logger: logging.Logger, what: str, *, interval: float = 10.0,
                 shown: int = 5, clock: Callable[[], float] = time.monotonic):
        self._logger, self._what = logger, what
        self._interval, self._shown, self._clock = interval, shown, clock
        self._held: list[str] = []
        self._detail = ""
        self._last_line: float | None = None

    def add(self, item: str, detail: str) -> None:
        """An event about `item`; `detail` (the circumstances) is the newest one's."""
        self._held.append(item)
        self._detail = detail
        self.flush()

    def flush(self) -> None:
        """Writes what is held if the last line is `interval` old (called on events and
        by whoever owns a periodic tick, so that the tail of a burst is not held on)."""
        now = self._clock()
        if not self._held or (self._last_line is not None
                              and now - self._last_line < self._interval):
            return
        held, self._held = self._held, []
        named = ", ".join(held[:self._shown]) + (
            f" and {len(held) - self._shown} more" if len(held) > self._shown else "")
        self._logger.warning("%s: %d (%s): %s", self._what, len(held), self._detail, named)
        self._last_line = now
