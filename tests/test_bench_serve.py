"""scripts/bench_serve.py against the suite's real Ray Serve instance (correctness of
its report only: speed is what it measures, not what a test asserts)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_serve_reports_every_figure(serve_base, tmp_path):
    out = tmp_path / "serve.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_serve.py"), "--url",
         serve_base.replace("http://", "ws://"), "--sessions", "2,1", "--seconds", "3",
         "--chunk-seconds", "0.2", "--stagger", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert [r["sessions"] for r in report["runs"]] == [1, 2]
    assert report["device"].startswith("cpu:")  # where the generator computed, from /health
    assert report["staggered"] and all(r["staggered"] for r in report["runs"])
    for r in report["runs"]:
        assert r["failed_sessions"] == 0, r["errors"]
        assert r["chunks"] >= 10 * r["sessions"]  # 3 s of 0.2 s chunks per session
        for key in ("time_to_first_audio_ms_p50", "update_latency_ms_p50",
                    "overhead_ms_p50"):
            assert r[key] is not None and r[key] > 0, key
        assert len(r["per_session"]) == r["sessions"]
        steps = r["generator_steps"]  # from /health, before and after the run
        assert steps["steps"] >= 3 * 25  # 3 s of 40 ms frames (and more at the start)
        assert steps["step_ms_mean"] > 0 and 0 <= steps["steps_over_frame_share"] <= 1
        assert 1 <= steps["rows_per_step_mean"] <= r["sessions"]
        assert steps["handout_ms_mean"] > 0  # host work per step: there is always some
    assert report["max_sessions_zero_underruns"] in (0, 1, 2)
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "max sessions with zero underruns" in run.stdout


def test_bench_serve_measures_bar_mode_jams_on_a_loop(serve_base, tmp_path):
    out = tmp_path / "bar.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_serve.py"), "--url",
         serve_base.replace("http://", "ws://"), "--sessions", "1", "--seconds", "5",
         "--loop-seconds", "4", "--bpm", "240", "--bars-per-chunk", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert (report["mode"], report["loop_seconds"], report["bpm"]) == ("bar", 4.0, 240.0)
    assert report["chunk_seconds"] == 2.0  # two 4/4 bars at 240 bpm
    assert report["bars_per_chunk"] == 2
    (r,) = report["runs"]
    assert r["failed_sessions"] == 0, r["errors"]
    assert r["chunks"] >= 3 and r["update_latency_ms_p50"] is not None
    assert r["per_session"][0]["mode"] == "bar"  # as the server's `started` said
    assert r["per_session"][0]["chunk_seconds"] == 2.0  # the server cut two bars
