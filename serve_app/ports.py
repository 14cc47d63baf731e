"""A free TCP port on this machine, for a server started beside its client (bench_local,
the tests). The port is free when asked; a caller that can race another process for it
retries (tests/serve_fixtures.py does)."""

from __future__ import annotations

import contextlib
import socket


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
