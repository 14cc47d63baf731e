"""The HTTP API through a real Ray Serve deployment graph (tiny variant, CPU).

The Serve instance is shared (conftest); the replica-kill test runs last in this
module and waits for the replacement replica to be ready before it returns.
"""

from __future__ import annotations

import base64
import io
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile as sf

from serve_app.api.settings import ApiSettings

from .serve_fixtures import wait_ready


@pytest.fixture
def base(serve_base):
    return serve_base


@pytest.fixture
def http(base):
    with httpx.Client(base_url=base, timeout=120) as client:
        yield client


def decode(b64: str) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(io.BytesIO(base64.b64decode(b64)), dtype="int16")
    return audio, rate


def start(http, **form) -> str:
    r = http.post("/jam/start", data={"styles": "ambient", **form})
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def stop(http, sid: str) -> None:
    http.post("/jam/stop", json={"session_id": sid})


def test_health_ping_landing_docs(http):
    health = http.get("/health").json()
    assert health["status"] == "ready" and health["variants"]["tiny"]["state"] == "ready"
    assert health["variants"]["tiny"]["compiled_buckets"] == [1, 2, 4]
    replica = health["variants"]["tiny"]["replicas"][0]
    assert replica["device"].startswith("cpu:") and replica["ray_resources"] == {"CPU": 1.0}
    assert http.get("/ping").json()["ok"] is True
    page = http.get("/")
    assert page.status_code == 200 and "Magenta RealTime 2" in page.text
    assert "/jam/start" in page.text and "crossfade_seconds" in page.text
    assert "/generate_style" in http.get("/openapi.json").json()["paths"]
    assert http.get("/docs").status_code == 200


@pytest.mark.parametrize(
    ("bpm", "bars", "beats", "rate"),
    [(120, 2, 4, None), (93.7, 3, 7, 44100), (87.5, 1, 4, 22050)],
)
def test_generate_style_returns_exact_bar_lengths(http, bpm, bars, beats, rate):
    form = {"styles": "disco funk, strings", "style_weights": "1.0, 0.5", "bpm": bpm,
            "bars": bars, "beats_per_bar": beats, "request_id": f"req-{bpm}", "seed": 3}
    if rate:
        form["target_sample_rate"] = rate
    r = http.post("/generate_style", data=form)
    assert r.status_code == 200, r.text
    body = r.json()
    meta = body["metadata"]
    sr = rate or 48000
    expected = round(bars * beats * 60 / bpm * sr)
    audio, file_rate = decode(body["audio_base64"])
    assert file_rate == meta["sample_rate"] == sr
    assert audio.shape == (expected, 2) and meta["total_samples"] == expected
    assert meta["styles"] == ["disco funk", "strings"] and meta["style_weights"] == [1.0, 0.5]
    assert meta["seconds_per_bar"] == pytest.approx(beats * 60 / bpm)
    assert body["request_id"] == f"req-{bpm}"
    assert body["ignored_params"] == []  # every field sent was read
    progress = http.get("/progress", params={"request_id": f"req-{bpm}"}).json()
    assert progress["stage"] == "done" and progress["percent"] == 100.0


def test_form_fields_a_route_does_not_read_are_listed_not_dropped_silently(http):
    """A misspelt field (the form's own, or one of a dependency's like `temperature`)
    is answered in `ignored_params`, as the WebSocket does; the rest applies."""
    # a frame-mode jam (chunk_seconds, no loop) does not use bar mode's settings: its rate
    # is /jam/next's target_sample_rate
    r = http.post("/jam/start", data={"styles": "x", "chunk_seconds": 0.2, "temprature": 0.5,
                                      "temperature": 0.9, "target_sample_rate": 44100,
                                      "loudness_mode": "rms"})
    assert r.status_code == 200, r.text
    assert r.json()["ignored_params"] == ["loudness_mode", "target_sample_rate", "temprature"]
    sid = r.json()["session_id"]
    bar = http.post("/jam/start", data={"styles": "x", "bars_per_chunk": 1,
                                        "target_sample_rate": 44100, "loudness_mode": "rms"})
    assert bar.status_code == 200 and bar.json()["ignored_params"] == [], bar.text
    assert bar.json()["sample_rate"] == 44100
    stop(http, bar.json()["session_id"])
    try:
        r = http.post("/jam/update", data={"session_id": sid, "tpok": 3, "topk": 30})
        assert r.status_code == 200 and r.json()["ignored_params"] == ["tpok"], r.text
        status = http.get("/jam/status", params={"session_id": sid}).json()
        assert status["topk"] == 30 and status["temperature"] == 0.9
    finally:
        stop(http, sid)
    r = http.post("/generate_style", data={"styles": "x", "bars": 1, "bmp": 100})
    assert r.status_code == 200 and r.json()["ignored_params"] == ["bmp"], r.text
    assert r.json()["metadata"]["bpm"] == 120  # the default, as the answer says


def test_progress_answers_from_either_ingress_replica_during_and_after_a_render(base):
    """The render's request stays on one ingress replica; Serve's proxy sends the polls to
    the less busy one, which held no record before the store was shared (49 of 49 polls
    during a render answered 404)."""
    form = {"styles": "jazz", "bpm": 120, "bars": 16, "seed": 5, "request_id": "poll-16"}
    answers = []
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=base, timeout=60) as poller:
        render = pool.submit(httpx.post, f"{base}/generate_style", data=form, timeout=300)
        while not render.done():
            r = poller.get("/progress", params={"request_id": "poll-16"})
            answers.append((r.status_code, r.json()))
            time.sleep(0.02)
        assert render.result().status_code == 200, render.result().text
        after = [poller.get("/progress", params={"request_id": "poll-16"}).json()
                 for _ in range(8)]
    codes = [code for code, _ in answers]
    assert 200 in codes, answers[-3:]
    first = codes.index(200)  # a poll before the render reached an ingress rightly gets 404
    assert set(codes[first:]) == {200}, answers
    generating = [body["n"] for _, body in answers[first:] if body["stage"] == "generating"]
    assert generating and generating == sorted(generating)
    begun = [body for _, body in answers[first:] if body["stage"] != "starting"]
    assert all(body["total"] == 800 for body in begun)  # 16 bars x 50 frames
    assert all(body == {"n": 0, "total": 0, "percent": 0.0, "stage": "starting"}
               for _, body in answers[first:] if body["stage"] == "starting")
    assert after == [{"n": 800, "total": 800, "percent": 100.0, "stage": "done"}] * 8


def test_rays_store_lists_and_sweeps_only_this_apps_progress_records(serve_root):
    import asyncio

    from deployments.kv import RayKV
    from serve_app.progress import ProgressBoard, RenderProgress

    mine, other = RayKV("mrt_test_sweep", "app-a"), RayKV("mrt_test_sweep", "app-b")
    expired = RenderProgress("done", expires_at=time.time() - 1).to_json()
    mine.put("old", expired)
    mine.put("live", RenderProgress("generating", expires_at=time.time() + 60).to_json())
    other.put("old", expired)
    assert sorted(mine.keys()) == ["live", "old"]
    assert asyncio.run(ProgressBoard(mine).sweep()) == 1
    assert mine.keys() == ["live"] and other.keys() == ["old"]


def test_a_failed_render_says_why_on_progress(http):
    r = http.post("/generate_style", data={"styles": "x", "bars": 65, "request_id": "too-long"})
    assert r.status_code == 400
    for _ in range(6):  # whichever ingress replica answers
        progress = http.get("/progress", params={"request_id": "too-long"}).json()
        assert progress["stage"] == "error"
        assert progress["error"] == r.json()["error"] == (
            "bars: at most 64 bars per request (intro included), got 65")


def test_intro_bars_are_dropped_from_the_same_render(http):
    form = {"styles": "funk", "bpm": 120, "bars": 1, "seed": 11}
    full = decode(http.post("/generate_style", data={**form, "bars": 2}).json()["audio_base64"])[0]
    tail = decode(http.post("/generate_style",
                            data={**form, "intro_bars_to_drop": 1}).json()["audio_base64"])[0]
    assert tail.shape == (96000, 2)
    fade = 240  # renders fade in and out over 5 ms so they never start with a click
    np.testing.assert_array_equal(tail[fade:], full[96000 + fade:])
    head, unfaded = np.abs(tail[:fade]).sum(), np.abs(full[96000:96000 + fade]).sum()
    assert tail[0].tolist() == [0, 0] and head < unfaded


def test_polling_jam_round_trip_with_prototype_shapes(http):
    r = http.post("/jam/start", data={"styles": "electronic, ambient",
                                      "style_weights": "1.0, 0.8", "temperature": 1.1,
                                      "topk": 40, "guidance_weight": 1.1, "bpm": 120,
                                      "bars_per_chunk": 1, "mean": 0.0,
                                      "centroid_weights": "0.0, 0.0, 0.0"})
    assert r.status_code == 200, r.text
    started = r.json()
    sid = started["session_id"]
    assert started["chunk_seconds"] == 2.0 and started["crossfade_seconds"] == 0.0
    assert started["steering_assets"] == {"mean": True, "centroids": 3}

    chunk = http.get("/jam/next", params={"session_id": sid}).json()["chunk"]
    audio, rate = decode(chunk["audio_base64"])
    assert chunk["index"] == 0 and rate == 48000 and audio.shape == (96000, 2)
    assert chunk["metadata"]["crossfade_seconds"] == 0.0

    assert http.post("/jam/consume", data={"session_id": sid, "chunk_index": 0}).status_code == 200
    update = http.post("/jam/update", data={"session_id": sid, "styles": "jazz, hiphop",
                                            "style_weights": "1.0, 0.8", "temperature": 1.2,
                                            "topk": 64, "mean": 0.2,
                                            "centroid_weights": "0.1, 0.3, 0.0",
                                            "style_ramp_seconds": 2})
    assert update.status_code == 200, update.text
    assert update.json()["applies_from_chunk"] >= 1
    status = http.get("/jam/status", params={"session_id": sid}).json()
    assert status["temperature"] == 1.2 and status["topk"] == 64
    assert status["last_consumed"] == 0
    second = http.get("/jam/next", params={"session_id": sid}).json()["chunk"]
    assert second["index"] == 1

    assert http.post("/jam/stop", json={"session_id": sid}).json()["stopped"] is True
    gone = http.get("/jam/status", params={"session_id": sid})
    assert gone.status_code == 404 and "unknown session" in gone.json()["error"]


def batch2_steps(http) -> int:
    return http.get("/health").json()["variants"]["tiny"]["batch_sizes"].get("2", 0)


def test_two_jams_share_one_batched_step(http):
    before = batch2_steps(http)
    a = start(http, chunk_seconds=0.2, pace="realtime")
    b = start(http, chunk_seconds=0.2, pace="realtime")
    try:
        for _ in range(8):  # a client per jam, reading as it plays
            for sid in (a, b):
                http.get("/jam/next", params={"session_id": sid})
        statuses = [http.get("/jam/status", params={"session_id": s}).json() for s in (a, b)]
        assert all(s["sessions_on_replica"] == 2 for s in statuses)
        # 8 chunks of 5 frames each: most of those ~40 steps carried both jams at once
        assert batch2_steps(http) - before >= 20
    finally:
        stop(http, a)
        stop(http, b)


def test_a_client_that_never_consumes_holds_bounded_memory(http):
    sid = start(http, chunk_seconds=0.08)  # asap, 4-chunk backlog (test config)
    try:
        time.sleep(3)
        first = http.get("/jam/status", params={"session_id": sid}).json()
        time.sleep(1)
        later = http.get("/jam/status", params={"session_id": sid}).json()
        assert first["backlog"] == later["backlog"] == 4 == later["max_backlog"]
        # paused: 4 chunks of 2 frames, and the one more step that handed out the last
        # frame's audio (the codec's decoder is one frame behind the codes)
        assert later["frames_generated"] == first["frames_generated"] == 4 * 2 + 1
        # Reading chunks without consuming lets old ones go, still within the bound.
        for expected in range(6):
            chunk = http.get("/jam/next", params={"session_id": sid}).json()["chunk"]
            assert chunk["index"] == expected
        final = http.get("/jam/status", params={"session_id": sid}).json()
        assert final["backlog"] <= 4 and final["dropped_chunks"] >= 2
    finally:
        stop(http, sid)


@pytest.mark.parametrize(
    ("route", "form", "status", "message"),
    [
        ("/jam/start", {"temperature": "hot"}, 422, "temperature:"),
        ("/jam/start", {"topk": 0}, 422, "topk:"),
        ("/jam/start", {"styles": ",".join("abcdefghij")}, 400, "styles: at most 8"),
        ("/jam/start", {"styles": "a", "style_weights": "1, 2"}, 400, "style_weights: got 2"),
        ("/jam/start", {"styles": "a", "style_weights": "-1"}, 400, "style_weights: weights"),
        # float() reads "nan" and "inf": they are refused, not blended into a NaN style
        # (which rendered in full and then failed as a 500)
        ("/generate_style", {"styles": "a", "style_weights": "nan"}, 400,
         "style_weights: 'nan' is not a finite number"),
        ("/jam/start", {"centroid_weights": "inf"}, 400,
         "centroid_weights: 'inf' is not a finite number"),
        ("/jam/start", {"temperature": "nan"}, 422, "temperature: Input should be a finite"),
        ("/jam/start", {"loop_weight": "nan"}, 422, "loop_weight: Input should be a finite"),
        ("/jam/start", {"variant": "mrt2_huge"}, 400, "variant: 'mrt2_huge' is not served"),
        ("/jam/start", {"pace": "warp"}, 400, "pace: must be one of"),
        # shorter than a frame was taken as one frame; refused as /ws/jam refuses it
        ("/jam/start", {"chunk_seconds": 0.001}, 422,
         "chunk_seconds: Input should be greater than or equal to 0.04"),
        ("/jam/start", {"chunk_seconds": 60}, 400,
         "chunk_seconds: must be within 0.04..50 seconds, got 60"),
        ("/jam/start", {"drums": "loud"}, 400, "drums: must be one of"),
        ("/jam/start", {"notes": "60, 200"}, 400, "notes: MIDI pitches must be 0..127"),
        ("/jam/start", {"centroid_weights": "1,1,1,1"}, 400, "centroid_weights: got 4"),
        # was "style_weights: weights must be ..."
        ("/jam/start", {"centroid_weights": "1,-1"}, 400,
         "centroid_weights: weights must be finite and >= 0, got [1.0, -1.0]"),
        # an hour at most (1e308 s overflowed the glide's frame count: a 500)
        ("/jam/update", {"session_id": "nope.tiny@x", "style_ramp_seconds": 1e308}, 422,
         "style_ramp_seconds: Input should be less than or equal to 3600"),
        ("/jam/start", {"bpm": 120, "bars_per_chunk": 64}, 400,
         "bars_per_chunk: 64 bars at 120 bpm make 128.0 s chunks; at most 50 s"),
        ("/generate_style", {"bpm": 5}, 400, "bpm: must be within"),
        ("/generate_style", {"bars": 500}, 400, "bars: at most"),
        ("/generate_style", {"target_sample_rate": 1000}, 400, "target_sample_rate:"),
        ("/generate_style", {"beats_per_bar": 0}, 400, "beats_per_bar:"),
        ("/jam/consume", {"session_id": "nope.tiny@x", "chunk_index": 0}, 404, "unknown session"),
        ("/jam/update", {"session_id": "nope.tiny@x", "topk": 5}, 404, "unknown session"),
        ("/jam/update", {"session_id": "", "topk": 5}, 422, "session_id: Field required"),
        ("/jam/stop", {}, 400, "session_id: required"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field(http, route, form, status, message):
    r = http.post(route, data=form)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_an_error_quotes_long_client_text_clipped(http):
    """A 5000-character id or name is quoted by its start and its length (it came back
    whole in every answer)."""
    long = "x" * 5000
    for method, route, kwargs in [
        ("get", "/jam/next", {"params": {"session_id": long}}),
        ("post", "/jam/stop", {"json": {"session_id": long}}),
        ("get", "/progress", {"params": {"request_id": long}}),
        ("post", "/jam/start", {"data": {"variant": long}}),
        ("post", "/jam/start", {"data": {"pace": long}}),
    ]:
        r = getattr(http, method)(route, **kwargs)
        error = r.json()["error"]
        assert r.status_code in (400, 404) and len(error) < 300, (route, r.status_code, error)
        assert re.search(r"x\.\.\. \(500[02] characters\)", error), (route, error)


def test_bad_input_leaves_a_running_jam_untouched(http):
    sid = start(http, chunk_seconds=0.2)
    try:
        first = http.get("/jam/next", params={"session_id": sid}).json()["chunk"]["index"]
        for form in ({"session_id": sid, "topk": 5000}, {"session_id": sid, "notes": "x"},
                     {"session_id": sid, "styles": "a", "style_weights": "1,2"},
                     {"session_id": sid, "styles": "a", "style_ramp_seconds": "1e308"}):
            assert http.post("/jam/update", data=form).status_code in (400, 422)
        assert http.post("/jam/consume", data={"session_id": sid,
                                               "chunk_index": 999}).status_code == 400
        assert http.get("/jam/next", params={"session_id": "bogus"}).status_code == 404
        empty = http.get("/jam/next", params={"session_id": ""})  # named, not "unknown"
        assert empty.status_code == 422 and empty.json()["error"].startswith("session_id:")
        nan = http.get("/jam/next", params={"session_id": sid, "timeout": "nan"})
        assert nan.json()["error"] == "timeout: Input should be a finite number"
        status = http.get("/jam/status", params={"session_id": sid}).json()
        assert status["topk"] == 40 and status["temperature"] == 1.3
        nxt = http.get("/jam/next", params={"session_id": sid}).json()["chunk"]["index"]
        assert nxt == first + 1
    finally:
        stop(http, sid)


def test_next_times_out_with_408_and_unknown_session_is_404(http):
    sid = start(http, chunk_seconds=10, pace="realtime")
    try:
        http.get("/jam/next", params={"session_id": sid})  # chunk 0 comes with the lead
        r = http.get("/jam/next", params={"session_id": sid, "timeout": 0.5})
        assert r.status_code == 408 and "no chunk ready within 0.5 s" in r.json()["error"]
    finally:
        stop(http, sid)
    assert http.get("/jam/next", params={"session_id": sid}).status_code == 404


def test_over_capacity_is_429_and_stop_all_frees_the_replica(http):
    sids = [start(http, chunk_seconds=1, pace="realtime") for _ in range(4)]
    r = http.post("/jam/start", data={"styles": "one too many"})
    assert r.status_code == 429 and "full (4 sessions per replica)" in r.json()["error"]
    assert http.post("/jam/stop_all").json()["stopped"] == 4
    for sid in sids:
        assert http.get("/jam/status", params={"session_id": sid}).status_code == 404
    assert http.get("/health").json()["variants"]["tiny"]["sessions"] == 0


def test_oversized_request_body_is_413(http):
    r = http.post("/jam/start", data={"styles": "x" * (26 * 1024 * 1024)})
    assert r.status_code == 413 and "request body" in r.json()["error"]


def test_generate_continues_a_120bpm_loop_for_exactly_8_bars(http):
    """The issue's acceptance check, as a client would `curl -F loop_audio=@loop.wav`."""
    from .test_loops import LOOP

    r = http.post("/generate", data={"bpm": "120", "bars": "8", "styles": "techno",
                                     "target_sample_rate": "44100", "request_id": "curl-8"},
                  files={"loop_audio": ("loop.wav", LOOP, "audio/wav")})
    assert r.status_code == 200, r.text
    audio, rate = decode(r.json()["audio_base64"])
    assert rate == 44100 and audio.shape == (8 * 2 * 44100, 2)
    meta = r.json()["metadata"]
    assert meta["total_samples"] == 705600 and meta["seconds_per_bar"] == 2.0
    assert meta["loudness"]["mode"] == "lufs" and meta["loop_duration_seconds"] == 4.0
    assert http.get("/progress", params={"request_id": "curl-8"}).json()["stage"] == "done"


def test_the_longest_loop_and_render_allowed_come_back_whole(http):
    """The largest messages the API makes, at its default limits, cross every hop: a loop
    of `max_loop_seconds` in (23 MB as float32 between replicas) and `max_render_seconds`
    out (31 MB of base64 WAV), longer than any streamed chunk may be."""
    from .test_loops import encoded, synth_loop

    limits = ApiSettings()
    loop = synth_loop(limits.max_loop_seconds, 48000, level=0.3)
    bars = int(limits.max_render_seconds // 2)  # 2 s bars at 120 bpm
    r = http.post("/generate", data={"bpm": "120", "bars": str(bars), "styles": "techno",
                                     "loudness_mode": "none", "seed": "5"},
                  files={"loop_audio": ("loop.wav", encoded(np.stack([loop, loop], 1), 48000),
                                        "audio/wav")})
    assert r.status_code == 200, r.text
    audio, rate = decode(r.json()["audio_base64"])
    assert rate == 48000 and audio.shape == (bars * 2 * 48000, 2)
    assert r.json()["metadata"]["loop_duration_seconds"] == limits.max_loop_seconds
    assert np.abs(audio[-48000:]).max() > 0  # the render's last second is music, not padding


def test_killed_generator_replica_gives_a_clear_error_then_recovers(http, base):
    import ray

    sid = start(http, chunk_seconds=0.2)
    http.get("/jam/next", params={"session_id": sid})
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "Generator_tiny" in a["name"]]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]))
    deadline = time.monotonic() + 240
    while True:
        r = http.get("/jam/next", params={"session_id": sid, "timeout": 1})
        if r.status_code == 404 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert r.status_code == 404, r.text
    assert "unknown session" in r.json()["error"]
    assert "start a new session" in r.json()["error"]
    wait_ready(base)
    fresh = start(http, chunk_seconds=0.2)
    assert http.get("/jam/next", params={"session_id": fresh}).json()["chunk"]["index"] == 0
    stop(http, fresh)
