"""Quiet, structured logging: `key=value` lines, WARNING by default (MRT_LOG_LEVEL).

Long work shows progress all the same: records of the `mrt_serve.progress` logger (a file
downloading, a model loading, each batch bucket compiling, a replica ready) are shown at
INFO unless the level is above WARNING. They come with a boot or a model switch, never
per request."""

from __future__ import annotations

import logging
import os
import sys

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
