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
