"""Quiet logs that still show long work, on the process's own stderr."""

from __future__ import annotations

import io
import logging
import sys

from serve_app import logs


def test_progress_shows_at_the_default_level_and_not_when_asked_for_errors_only():
    progress, other = logging.getLogger(logs.PROGRESS_LOGGER), logging.getLogger("mrt_serve.x")
    try:
        logs.configure("WARNING")
        assert progress.isEnabledFor(logging.INFO) and not other.isEnabledFor(logging.INFO)
        logs.configure("ERROR")
        assert not progress.isEnabledFor(logging.INFO)
        assert not progress.isEnabledFor(logging.WARNING)
    finally:
        logs.configure()


def test_logs_reach_the_real_stderr_past_a_redirected_sys_stderr(monkeypatch, capfd):
    """In a Serve replica under scripts/serve (RAY_SERVE_LOG_TO_STDERR=0), `sys.stderr` is
    Serve's redirect into the replica's log file; our progress and warnings would never
    reach `serve run`'s console through it."""
    redirected = io.StringIO()
    monkeypatch.setattr(sys, "stderr", redirected)
    try:
        logs.configure("WARNING")
        logging.getLogger(logs.PROGRESS_LOGGER).info("generator tiny: compiled batch bucket 1")
        logging.getLogger("mrt_serve.generator").warning("generator tiny: falling behind")
    finally:
        logs.configure()
    err = capfd.readouterr().err
    assert "msg=generator tiny: compiled batch bucket 1" in err
    assert "level=WARNING logger=mrt_serve.generator msg=generator tiny: falling behind" in err
    assert redirected.getvalue() == ""


def test_a_burst_of_warnings_is_one_line_at_once_and_one_summary_after_the_interval(caplog):
    """Forty sessions falling behind in one step are two lines, not forty: the first at
    once, the other 39 summed up when the interval has passed (a periodic flush)."""
    now = [100.0]
    burst = logs.BurstWarning(logging.getLogger("mrt_serve.test"), "gen: fell behind",
                              interval=10.0, shown=3, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="mrt_serve.test"):
        for n in range(40):
            burst.add(f"s{n}", f"batch {n + 1}")
        assert [r.getMessage() for r in caplog.records] == ["gen: fell behind: 1 (batch 1): s0"]
        now[0] += 9.9
        burst.flush()
        assert len(caplog.records) == 1  # still inside the interval
        now[0] += 0.1
        burst.flush()
        burst.flush()  # nothing held: nothing written
        assert [r.getMessage() for r in caplog.records][1:] == [
            "gen: fell behind: 39 (batch 40): s1, s2, s3 and 36 more"]
        now[0] += 60
        burst.add("s40", "batch 2")  # a quiet spell: the next one is written at once
    assert [r.levelname for r in caplog.records] == ["WARNING"] * 3
    assert caplog.records[-1].getMessage() == "gen: fell behind: 1 (batch 2): s40"
