"""WebSocket flow control's lead cap, on a clock the test moves."""

from __future__ import annotations

import asyncio

import numpy as np

from serve_app.api.flow import FlowControl, StreamCredit
from serve_app.jam import Chunk


def test_the_lead_cap_counts_each_chunk_at_its_own_sample_rate():
    """A bar-mode chunk resampled to 44.1 kHz holds 2 s of audio in 88200 samples:
    counted at 48 kHz it would read 1.84 s, and the stream would run 8% further
    ahead of the listener than the cap allows."""
    now = [0.0]
    flow = FlowControl(window=None, default_window=4, max_lead_seconds=1.0,
                       clock=lambda: now[0])
    flow.sent(Chunk(0, np.zeros((88200, 2), np.int16), 0, 0.0, rate=44100))
    assert (flow.sent_seconds, flow.last_sent) == (2.0, 0)

    async def room_within(seconds: float) -> bool:
        try:
            await asyncio.wait_for(flow.wait_for_room(), seconds)
            return True
        except TimeoutError:
            return False

    now[0] = 0.9  # 1.1 s ahead of the clock: over the 1 s cap
    assert not asyncio.run(room_within(0.05))
    now[0] = 1.0
    assert asyncio.run(room_within(0.05))


def test_a_stream_credit_is_refilled_by_half_and_never_runs_further_ahead():
    """The generator may send `size` chunks before its consumer takes one; each refill
    restores that, once half is used, so a steady stream makes one grant per size/2."""
    credit = StreamCredit(size=8)
    grants = [credit.took() for _ in range(12)]
    assert grants == [0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, 4]
    # granted in all never exceeds taken + size: the bound a stalled client relies on
    assert 8 + sum(grants) == 12 + credit.ahead <= 12 + 8
