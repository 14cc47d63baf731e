"""Encoding long chunks off the event loop.

One event loop streams every jam on a replica (in Ray, the ingress's), so whatever
one response costs there, every other stream waits for. A chunk's WAV, base64 and
JSON cost about a millisecond per second of audio on the dev box, tens of ms for the
longest chunks (50 s: 50 ms, 78 ms resampled for /jam/next). Long chunks are encoded
in a thread; short ones stay inline, where a thread hop would cost more than it saves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

INLINE_SECONDS = 1.0  # chunks up to this long are encoded on the loop


async def encode(seconds: float, work: Callable[[], T]) -> T:
    """`work()`, in a thread when it encodes more than `INLINE_SECONDS` of audio."""
    if seconds <= INLINE_SECONDS:
        return work()
    return await asyncio.to_thread(work)
