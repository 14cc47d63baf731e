"""Jamming on a loop: decoding, the bar clock, loudness, prefill and the loop routes.

The routes run in-process (our FastAPI app over a real GeneratorCore with the tiny
model); tests/test_serve_http.py and tests/test_ws.py run them through Ray Serve.
"""

from __future__ import annotations

import base64
import io
import time
from fractions import Fraction

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from serve_app.api.app import create_app
from serve_app.api.settings import ApiSettings
from serve_app.audio.barclock import BarClock
from serve_app.audio.bars import BarChunker
from serve_app.audio.context import fit_to_bars, tiled_context
from serve_app.audio.decode import decode_audio
from serve_app.audio.loudness import LoudnessMatcher, lufs
from serve_app.audio.synth import synth_loop
from serve_app.engine.session import BeatPulse
from serve_app.generator import GeneratorCore
from serve_app.styles.service import StyleService


def encoded(audio: np.ndarray, rate: int = 44100, fmt: str = "WAV", **kw) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt, **kw)
    return buf.getvalue()


def read(b64: str) -> tuple[np.ndarray, int]:
    return sf.read(io.BytesIO(base64.b64decode(b64)), dtype="float32", always_2d=True)


# -- audio in -----------------------------------------------------------------
@pytest.mark.parametrize(("fmt", "subtype", "rate", "channels"), [
    ("WAV", "PCM_16", 44100, 1), ("FLAC", "PCM_24", 96000, 2), ("OGG", "VORBIS", 32000, 2),
    ("MP3", "MPEG_LAYER_III", 44100, 2),
])
def test_uploads_in_any_format_rate_and_layout_become_48k_stereo(fmt, subtype, rate, channels):
    loop = synth_loop(2.0, rate, level=0.3)
    audio = np.stack([loop] * channels, 1) if channels == 2 else loop
    out = decode_audio(encoded(audio, rate, fmt, subtype=subtype), max_seconds=30)
    assert out.dtype == np.float32 and out.shape[1] == 2
    assert abs(out.shape[0] - 2 * 48000) < 0.01 * 48000  # codecs may pad a few ms
    assert np.abs(out).max() > 0.1


@pytest.mark.parametrize(("data", "message"), [
    (b"", "loop_audio: the upload is empty"),
    (b"RIFF not really a wav", "loop_audio: could not decode the audio"),
    (encoded(np.zeros(44100, np.float32)), "loop_audio: the audio is silent"),
    (encoded(synth_loop(5.0)), "loop_audio: 5.0 s is longer than the 3 s allowed"),
    (encoded(np.zeros((0, 2), np.float32)), "loop_audio: the file holds no audio samples"),
    # was tiled into a buzz (or, one sample, a constant) and continued
    (encoded(synth_loop(0.035)), r"loop_audio: 0.035 s is shorter than one frame of the "
                                 r"model \(0.04 s\)"),
])
def test_bad_uploads_are_refused_with_the_reason(data, message):
    with pytest.raises(ValueError, match=message):
        decode_audio(data, max_seconds=3)


# -- bar clock ----------------------------------------------------------------
@pytest.mark.parametrize(("bpm", "beats", "bars", "rate"), [
    (93.7, 7, 3, 44100), (93.7, 7, 5, 48000), (120, 4, 8, 44100), (61.3, 3, 4, 22050),
    (174.0, 4, 16, 16000),
])
def test_bar_lengths_are_exact_at_awkward_tempos(bpm, beats, bars, rate):
    clock = BarClock(bpm, beats)
    exact = Fraction(bars * beats * 60) / Fraction(str(bpm)) * rate
    assert clock.samples(bars, rate) == round(exact)
    assert clock.frames_to_cover(bars) * 1920 >= clock.samples(bars)


def test_bar_chunks_stay_on_the_grid_over_fifty_chunks():
    clock = BarClock(93.7, 7)
    chunker = BarChunker(clock, bars_per_chunk=1, rate=44100)
    frame = np.full((1920, 2), 1000, np.int16)
    chunks = []
    while len(chunks) < 50:
        chunks += chunker.feed(frame)
    lengths = [c.audio.shape[0] for c in chunks[:50]]
    for k, length in enumerate(lengths):  # chunk k is exactly [bar k, bar k+1)
        assert length == clock.boundary(k + 1, 44100) - clock.boundary(k, 44100)
    exact = Fraction(50 * 7 * 60 * 44100) / Fraction("93.7")
    assert abs(sum(lengths) - exact) <= 0.5  # no drift after 50 bars
    assert [c.first_bar for c in chunks[:3]] == [0, 1, 2]


def test_beat_pulses_fall_on_exact_beats():
    pulse = BeatPulse(93.7)  # a beat every 0.6403... s = 16.008... frames
    hits = [f for f in range(2000) if pulse.next_frame()]
    beat_frames = Fraction(60 * 25) / Fraction("93.7")
    assert hits == [int(k * beat_frames) for k in range(len(hits))]
    assert len(hits) == int(2000 / beat_frames) + 1


# -- context ------------------------------------------------------------------
def test_loop_context_is_whole_bars_ending_on_a_bar_line():
    clock = BarClock(120)  # 2 s bars
    loop = np.arange(int(3.9 * 48000), dtype=np.float32)[:, None].repeat(2, 1)
    bars = fit_to_bars(loop, clock)
    assert bars.shape[0] == clock.samples(2)  # 3.9 s -> 2 bars, extended by repetition
    context = tiled_context(loop, clock, frames=30)
    assert context.shape[0] == 40 * 1920  # 30 frames + 10 encoder warm-up frames
    # the last 1.6 s of the bar-fitted loop: the context ends where the loop's bars end
    np.testing.assert_array_equal(context, bars[-context.shape[0]:])
    long = tiled_context(loop, clock, frames=200)  # 8 s: the 4 s of bars, twice
    np.testing.assert_array_equal(long[-2 * bars.shape[0]:], np.concatenate([bars, bars]))


# -- loudness ------------------------------------------------------------------
def test_loudness_matcher_hits_the_loop_and_respects_headroom():
    rng = np.random.default_rng(0)
    loop = np.stack([synth_loop(4.0, 48000, level=0.05)] * 2, 1)
    quiet = (0.001 * rng.standard_normal((8 * 48000, 2))).astype(np.float32)
    out, report = LoudnessMatcher(loop, "lufs", 1.0).apply(quiet, [0, 96000, 192000, 288000])
    assert abs(lufs(out) - lufs(loop)) < 0.5
    assert report["mode"] == "lufs" and len(report["bar_gains_db"]) == 4
    loud = LoudnessMatcher(loop * 12, "lufs", 6.0).apply(quiet, [0])[0]
    assert np.abs(loud).max() <= 10 ** (-6 / 20) + 1e-6  # capped 6 dB below full scale
    assert LoudnessMatcher(loop, "rms").apply(quiet, [0])[1]["mode"] == "rms"
    with pytest.raises(ValueError, match="loudness_mode: must be one of"):
        LoudnessMatcher(loop, "loud")


def test_a_bar_chunker_measures_its_loop_once_for_the_mode_its_bars_use():
    loop = np.stack([synth_loop(4.0, 48000, level=0.05)] * 2, 1)
    matcher = LoudnessMatcher(loop, "auto")
    BarChunker(BarClock(120, 4), 1, loudness=matcher)  # 2 s bars: BS.1770
    assert matcher._reference_db == {"lufs": pytest.approx(lufs(loop))}
    short = LoudnessMatcher(loop, "auto")
    BarChunker(BarClock(300, 1), 1, loudness=short)  # 0.2 s bars: too short to gate
    assert list(short._reference_db) == ["rms"]
    quiet = (0.001 * np.random.default_rng(1).standard_normal((96000, 2))).astype(np.float32)
    measured_once = matcher.apply(quiet, [0])[0]
    np.testing.assert_array_equal(measured_once, LoudnessMatcher(loop, "auto").apply(quiet, [0])[0])


# -- routes (in-process) -----------------------------------------------------
@pytest.fixture(scope="module")
def api(tiny):
    core = GeneratorCore("tiny", loaded=tiny, max_sessions=4, buckets=(1, 2, 4))
    app = create_app({"tiny": core}, StyleService(tiny.style),
                     ApiSettings(max_loop_seconds=30, max_backlog_chunks=4))
    with TestClient(app) as client:  # one event loop for the module, as in a server
        deadline = time.monotonic() + 300
        while client.get("/health").json()["status"] != "ready":
            assert time.monotonic() < deadline, client.get("/health").json()
            time.sleep(0.5)
        yield client
    core.shutdown()


LOOP = encoded(synth_loop())


def generate(api, files=True, **form):
    data = {"bpm": "120", "styles": "techno", "seed": "3", **{k: str(v) for k, v in form.items()}}
    return api.post("/generate", data=data,
                    files={"loop_audio": ("loop.wav", LOOP, "audio/wav")} if files else None)


@pytest.mark.parametrize(("bpm", "beats", "bars", "rate"), [
    (120, 4, 8, 44100), (93.7, 7, 3, 22050), (140, 3, 2, 48000),
])
def test_generate_returns_exact_bars_loudness_matched(api, bpm, beats, bars, rate):
    r = generate(api, bpm=bpm, beats_per_bar=beats, bars=bars, target_sample_rate=rate)
    assert r.status_code == 200, r.text
    audio, got_rate = read(r.json()["audio_base64"])
    meta = r.json()["metadata"]
    expected = round(Fraction(bars * beats * 60) / Fraction(str(bpm)) * rate)
    assert got_rate == rate and audio.shape == (expected, 2) and meta["total_samples"] == expected
    assert meta["loudness"]["mode"] == "lufs" and len(meta["loudness"]["bar_gains_db"]) == bars
    loop = np.stack([synth_loop()] * 2, 1)
    assert abs(lufs(audio, rate) - lufs(loop, 44100)) < 0.5
    assert meta["styles"] == ["techno", "loop"] and meta["loop_duration_seconds"] == 4.0
    assert meta["context_frames"] == 25  # tiny's receptive field (1 layer x 25 frames)


def test_the_loop_changes_the_music_and_the_same_loop_repeats_it(api):
    form = {"bars": 2, "loudness_mode": "none", "loop_weight": 0}
    with_loop = read(generate(api, **form).json()["audio_base64"])[0]
    again = read(generate(api, **form).json()["audio_base64"])[0]
    without = api.post("/generate_style", data={"bpm": "120", "bars": "2", "styles": "techno",
                                                 "seed": "3"})
    np.testing.assert_array_equal(with_loop, again)
    assert not np.array_equal(with_loop, read(without.json()["audio_base64"])[0])


def test_intro_bars_are_dropped_and_progress_reports_stages(api):
    r = generate(api, bars=2, intro_bars_to_drop=1, request_id="intro-1", loudness_mode="none")
    assert r.status_code == 200 and r.json()["request_id"] == "intro-1"
    assert read(r.json()["audio_base64"])[0].shape[0] == 2 * 96000
    assert api.get("/progress", params={"request_id": "intro-1"}).json() == {
        "n": 150, "total": 150, "percent": 100.0, "stage": "done"}  # 3 bars x 50 frames


@pytest.mark.parametrize(("form", "files", "message"), [
    ({}, {"loop_audio": ("x.wav", b"", "audio/wav")}, "loop_audio: the upload is empty"),
    ({}, {"loop_audio": ("x.mp3", b"\x00garbage", "audio/mpeg")}, "loop_audio: could not"),
    ({}, {"loop_audio": ("x.wav", encoded(np.zeros(4410, np.float32)), "audio/wav")},
     "loop_audio: the audio is silent"),
    ({}, {"loop_audio": ("x.wav", encoded(synth_loop(31.0)), "audio/wav")},
     "loop_audio: 31.0 s is longer than the 30 s allowed"),
    ({}, {"loop_audio": ("x.wav", encoded(synth_loop(0.002)), "audio/wav")},
     "loop_audio: 0.002 s is shorter than one frame of the model (0.04 s)"),
    ({"loudness_mode": "loud"}, None, "loudness_mode: must be one of"),
    ({"bpm": "5"}, None, "bpm: must be within"),
])
def test_bad_loops_are_refused_while_a_jam_keeps_streaming(api, form, files, message):
    sid = api.post("/jam/start", data={"styles": "ambient", "chunk_seconds": "0.2"}).json()[
        "session_id"]
    first = api.get("/jam/next", params={"session_id": sid}).json()["chunk"]["index"]
    data = {"bpm": "120", "styles": "x", **form}
    r = api.post("/generate", data=data,
                 files=files or {"loop_audio": ("loop.wav", LOOP, "audio/wav")})
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert api.get("/jam/next", params={"session_id": sid}).json()["chunk"]["index"] > first
    api.post("/jam/stop", json={"session_id": sid})


def test_bar_mode_jam_reseed_and_splice(api):
    r = api.post("/jam/start", data={"styles": "funk", "bpm": "93.7", "beats_per_bar": "7",
                                     "bars_per_chunk": "1", "target_sample_rate": "44100",
                                     "loudness_mode": "none"},
                 files={"loop_audio": ("loop.wav", LOOP, "audio/wav")})
    started = r.json()
    assert r.status_code == 200 and started["mode"] == "bar", r.text
    assert started["prefill_frames"] == 25 and started["sample_rate"] == 44100
    sid = started["session_id"]
    clock = BarClock(93.7, 7)

    def next_chunk():
        c = api.get("/jam/next", params={"session_id": sid}).json()["chunk"]
        api.post("/jam/consume", data={"session_id": sid, "chunk_index": c["index"]})
        return c

    chunks = [next_chunk() for _ in range(3)]
    for k, c in enumerate(chunks):
        assert c["index"] == k and c["metadata"]["first_bar"] == k
        length = clock.boundary(k + 1, 44100) - clock.boundary(k, 44100)
        assert read(c["audio_base64"])[0].shape[0] == c["metadata"]["samples"] == length
    status = api.get("/jam/status", params={"session_id": sid}).json()
    assert status["frames_forced"] == 25 and status["prefill_pending_frames"] == 0

    new_loop = encoded(synth_loop(2.0, bpm=93.7, level=0.1))
    r = api.post("/jam/reseed", data={"session_id": sid},
                 files={"loop_audio": ("new.wav", new_loop, "audio/wav")}).json()
    assert r["context_frames"] == 25 and r["anchor_frames"] == 0
    assert r["applies_from_chunk"] >= 3
    while next_chunk()["index"] < r["applies_from_chunk"]:
        pass
    status = api.get("/jam/status", params={"session_id": sid}).json()
    assert status["frames_forced"] == 50  # the new loop went into the context

    r = api.post("/jam/reseed_splice", data={"session_id": sid, "anchor_bars": "0.5"},
                 files={"loop_audio": ("new.wav", new_loop, "audio/wav")}).json()
    # half a 4.48 s bar is 56 frames, capped so at least one new-loop frame remains
    assert r["anchor_frames"] == 24 and r["context_frames"] == 25
    r = api.post("/jam/reseed", data={"session_id": sid},
                 files={"loop_audio": ("x.wav", b"junk", "audio/wav")})
    assert r.status_code == 400 and "loop_audio: could not decode" in r.json()["error"]
    r = api.post("/jam/update", data={"session_id": sid, "use_current_mix_as_style": "true"})
    assert r.status_code == 200, r.text
    api.post("/jam/stop", json={"session_id": sid})
