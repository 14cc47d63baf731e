"""Quiet, structured logging: `key=value` lines, WARNING by default (MRT_LOG_LEVEL)."""

from __future__ import annotations

import logging
import os

_NOISY = ("absl", "jax", "jax._src", "ray", "filelock", "urllib3", "httpx")


def configure(level: str | None = None) -> None:
    level = (level or os.environ.get("MRT_LOG_LEVEL", "WARNING")).upper()
    logging.basicConfig(
        level=level,
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
        force=True,
    )
    for name in _NOISY:  # third-party INFO (absl logs every layer trace) stays hidden
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
