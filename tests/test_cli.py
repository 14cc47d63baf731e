"""The offline commands as a user runs them: `mrt-serve generate` and the engine benchmark."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import soundfile as sf

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent


def test_generate_writes_a_48k_stereo_wav_and_makes_the_tiny_repo_on_first_use(tmp_path):
    fresh_repo = tmp_path / "no-tiny-repo-yet"
    out = tmp_path / "jam.wav"
    result = subprocess.run(
        [str(BIN / "mrt-serve"), "generate", "--variant", "tiny", "--styles", "disco funk",
         "--style-weights", "1.0", "--seconds", "4", "--seed", "7", "--out", str(out)],
        env={**os.environ, "MRT_TINY_REPO": str(fresh_repo)},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert (fresh_repo / "checkpoints/tiny.safetensors").is_file()
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.frames) == (48000, 2, 4 * 48000)
    assert "generating" in result.stderr  # the progress bar
    assert f"wrote {out}" in result.stdout


def test_generate_rejects_bad_input_naming_the_field(tmp_path):
    result = subprocess.run(
        [str(BIN / "mrt-serve"), "generate", "--variant", "tiny", "--styles", "a,b",
         "--style-weights", "1,x", "--out", str(tmp_path / "x.wav")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "style_weights: 'x' is not a number" in result.stderr
    assert not (tmp_path / "x.wav").exists()


def test_bench_prefill_times_both_ways_of_forcing_a_loop(tmp_path, tiny_repo):
    out = tmp_path / "prefill.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_prefill.py"), "--variant", "tiny",
         "--repo", str(tiny_repo), "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["context_frames"] == 25 and report["prefill_runs"] == [16, 4]
    assert report["encode_ms"] > 0 and report["force_ms"] > 0
    assert report["runs_speedup"] == pytest.approx(
        report["force_ms_frame_by_frame"] / report["force_ms"], rel=1e-2)
    assert "force frame by frame" in result.stdout and "in runs" in result.stdout


def test_bench_engine_prints_a_table_and_writes_json(tmp_path, tiny_repo):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_engine.py"), "--variant", "tiny",
         "--batch", "1,2", "--frames", "4", "--warmup", "1", "--compare-upstream",
         "--breakdown", "--profile", str(tmp_path / "profile"), "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["variant"] == "tiny" and report["device"].startswith("cpu")
    # XLA:CPU's allocator keeps no count: said as null, not made up
    assert report["device_memory_gb_loaded"] is None and report["device_memory_gb"] is None
    assert [r["batch"] for r in report["results"]] == [1, 2]
    assert [r["rows"] for r in report["results"]] == [1, 2]  # CPU keeps 1-row steps
    for row in report["results"]:
        assert row["ms_per_frame"] > 0
        # the host's share of each step, timed inside it: no more than the whole
        assert 0 < row["dispatch_ms"] <= row["ms_per_frame"]
        assert row["depthformer_ms"] > 0 and row["decoder_ms"] > 0
        # a few more steps under the profiler, read back from their trace
        profile = row["profile"]
        assert profile["steps"] == 5 and 0 < profile["dispatch_ms"] <= profile["step_ms"]
        assert profile["device_busy_ms"] is None  # XLA:CPU: no device lanes
        assert (tmp_path / "profile" / f"batch-{row['batch']}") in pathlib.Path(
            profile["trace"]).parents
        # the JSON rounds each figure from the unrounded median
        assert row["frames_per_second"] == pytest.approx(row["batch"] * 1000 / row["ms_per_frame"],
                                                         rel=1e-3)
        assert row["rtf_per_stream"] == pytest.approx(40 / row["ms_per_frame"], rel=1e-3)
    assert report["upstream_ms_per_frame"] > 0 and report["speedup_vs_upstream"] > 0
    assert "ms/frame" in result.stdout and "upstream" in result.stdout
    assert "depthformer" in result.stdout and "batch 2 profile: step" in result.stdout
    # XLA's FLOP count is of the whole batched call: two rows do about twice the work
    one, two = report["results"]
    for half in ("depthformer", "decoder"):
        assert one[f"{half}_gflop"] > 0
        assert 1.7 < two[f"{half}_gflop"] / one[f"{half}_gflop"] < 2.3, half
        assert one[f"{half}_gflops"] == pytest.approx(
            one[f"{half}_gflop"] / one[f"{half}_ms"] * 1000, rel=0.01)
    assert report["matmul_peak_gflops"] > 0 and "GFLOP/s" in result.stdout
