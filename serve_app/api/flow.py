"""Flow control for one WebSocket stream: memory stays bounded whatever the client reads.

A WebSocket send through Ray Serve's proxy returns once the proxy has the bytes, not
once the client has them, so a client that stops reading would make the proxy buffer
an `asap` stream without end. Two bounds stop that, both enforced by not fetching the
next chunk (the generator then pauses when its own backlog fills):

- a credit window: a client that acks chunks (`{"type": "ack", "index": N}`, or
  `consume` in bar mode) never has more than `window` chunks sent and unacked. It
  applies from `start` when the client asks for one (`window_chunks`), else from its
  first ack, so the prototype's clients, which never ack, keep working;
- a lead cap: audio sent never runs more than `max_lead_seconds` ahead of the wall
  clock since the first chunk, which bounds clients that never ack.

The chunks come over one stream per session (`GeneratorClient.chunks`), which a transport
buffers on its own (gRPC, several MB): `StreamCredit` keeps the generator at most a few
chunks ahead of what this side has taken, so not fetching still pauses it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..jam import Chunk


# Chunks a session's stream may run ahead of the chunks taken from it. Refilled by half,
# so a steady stream makes one `grant` call per 4 chunks.
STREAM_CREDIT_CHUNKS = 8


class StreamCredit:
    """The credit of one chunk stream, as its consumer counts it."""

    def __init__(self, size: int = STREAM_CREDIT_CHUNKS) -> None:
        self.size = size
        self.ahead = size  # chunks the generator may send before it needs more

    def took(self) -> int:
        """One chunk taken from the stream; returns how many to grant now (0: none)."""
        self.ahead -= 1
        if self.ahead > self.size // 2:
            return 0
        more, self.ahead = self.size - self.ahead, self.size
        return more


class FlowControl:
    def __init__(self, *, window: int | None, default_window: int, max_lead_seconds: float,
                 clock=time.monotonic) -> None:
        self.window = window
        self.default_window = default_window
        self.max_lead_seconds = max_lead_seconds
        self._clock = clock
        self._first_sent_at: float | None = None
        self.sent_seconds = 0.0
        self.last_sent = -1
        self.last_acked = -1
        self.waits = 0  # times the stream held back for the client
        self._acked = asyncio.Event()

    def sent(self, chunk: Chunk) -> None:
        """Counts a chunk sent: its index for the window, its length at its own sample
        rate (bar mode may resample) for the lead cap."""
        if self._first_sent_at is None:
            self._first_sent_at = self._clock()
        self.sent_seconds += chunk.seconds
        self.last_sent = chunk.index

    def ack(self, index: int) -> None:
        if index > self.last_sent:
            raise ValueError(f"index: chunk {index} has not been sent yet "
                             f"(last sent is {self.last_sent})")
        if self.window is None:
            self.window = self.default_window
        self.last_acked = max(self.last_acked, index)
        self._acked.set()

    @property
    def unacked(self) -> int:
        return self.last_sent - self.last_acked

    def _lead_wait(self) -> float:
        """Seconds until the lead cap allows another chunk (0: now)."""
        if self._first_sent_at is None:
            return 0.0
        elapsed = self._clock() - self._first_sent_at
        return max(0.0, self.sent_seconds - elapsed - self.max_lead_seconds)

    async def wait_for_room(self) -> None:
        """Returns when one more chunk may be sent."""
        counted = False
        while True:
            window_full = self.window is not None and self.unacked >= self.window
            delay = 0.0 if window_full else self._lead_wait()
            if not window_full and delay <= 0:
                return
            if not counted:
                self.waits += 1
                counted = True
            if window_full:
                self._acked.clear()
                await self._acked.wait()
            else:
                await asyncio.sleep(delay)

    def status(self) -> dict:
        return {"window_chunks": self.window, "last_sent": self.last_sent,
                "last_acked": self.last_acked, "flow_waits": self.waits,
                "max_lead_seconds": self.max_lead_seconds}
