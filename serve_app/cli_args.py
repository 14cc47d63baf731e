"""Argument types for the command-line tools (`mrt-serve`, `scripts/bench_*.py`).

argparse calls these on the text given and answers a bad value with "argument --NAME:
<reason>" and exit status 2, before anything loads, compiles or connects. Without them a
NaN, a negative count or a typo in a list came out later as a traceback from deep inside
(`cannot convert float NaN to integer`, `no median for empty data`), or, for a NaN
duration, as a run that never ended.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def positive_ints(text: str) -> list[int]:
    """Comma-separated positive integers ("1,2,4"; spaces and empty items ignored),
    sorted, without repeats."""
    try:
        values = sorted({int(item) for item in text.split(",") if item.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(
            f"positive integers, comma-separated (e.g. 1,2,4), got {text!r}")
    return values


def integer(minimum: int) -> Callable[[str], int]:
    """An integer of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"an integer of at least {minimum}, got {text!r}")
        return value

    return parse


def seconds(*, zero: bool = False) -> Callable[[str], float]:
    """A finite number of seconds above 0 (from 0 with `zero`, where 0 means "none")."""
    bound = "at least 0" if zero else "more than 0"

    def parse(text: str) -> float:
        value = _number(text)
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"seconds, a finite number {bound}, got {text!r}")
        return value

    return parse


def finite(text: str) -> float:
    """Any finite number (its range is checked where it is used, naming it)."""
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"a finite number, got {text!r}")
    return value


def _number(text: str) -> float:
    """The number written, NaN for text that is none (refused with the rest)."""
    try:
        return float(text)
    except ValueError:
        return math.nan
