"""Static web pages served by the API (no build step)."""

from __future__ import annotations

import functools
import importlib.resources


@functools.cache
def page(name: str) -> str:
    return importlib.resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
