"""`/ws/jam` protocol conformance through real Ray Serve with a real WebSocket client."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import pathlib
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
import websockets.asyncio.client
from websockets.sync.client import connect

from serve_app.api.flow import STREAM_CREDIT_CHUNKS
from serve_app.client import stop_and_wait

from .serve_fixtures import recv_json, replica_processes

BIN = pathlib.Path(sys.executable).parent

# The prototype's documented messages, verbatim (SPEC §3 and its landing page).
PROTOTYPE_START = {
    "type": "start", "mode": "rt", "binary_audio": False,
    "params": {"styles": "electronic, ambient", "style_weights": "1.0, 0.8",
               "temperature": 1.1, "topk": 40, "guidance_weight": 1.1, "pace": "realtime",
               "style_ramp_seconds": 8.0, "mean": 0.0, "centroid_weights": "0.0, 0.0, 0.0"},
}
PROTOTYPE_UPDATE = {
    "type": "update", "styles": "jazz, hiphop", "style_weights": "1.0, 0.8",
    "temperature": 1.2, "topk": 64, "guidance_weight": 1.0, "mean": 0.2,
    "centroid_weights": "0.1, 0.3, 0.0",
}


@pytest.fixture
def ws_url(serve_base):
    return serve_base.replace("http://", "ws://") + "/ws/jam"


def recv_binary_chunk(ws) -> tuple[bytes, dict]:
    payload = ws.recv(timeout=60)
    while not isinstance(payload, bytes):
        payload = ws.recv(timeout=60)
    meta = json.loads(ws.recv(timeout=60))
    assert meta["type"] == "chunk_meta"
    return payload, meta


def test_prototype_start_update_stop_in_json_mode(ws_url):
    with connect(ws_url) as ws:
        ws.send(json.dumps(PROTOTYPE_START))
        started = recv_json(ws)
        assert started["type"] == "started" and started["mode"] == "rt"
        for key in ("session_id", "variant", "sample_rate", "channels", "chunk_seconds",
                    "crossfade_seconds", "steering_assets"):
            assert key in started
        assert (started["sample_rate"], started["channels"]) == (48000, 2)
        assert started["chunk_seconds"] == 2.0 and started["crossfade_seconds"] == 0.0
        assert started["steering_assets"] == {"mean": True, "centroids": 3}

        chunk = recv_json(ws, "chunk")
        audio, rate = sf.read(io.BytesIO(base64.b64decode(chunk["audio_base64"])), dtype="int16")
        assert chunk["index"] == 0 and rate == 48000 and audio.shape == (96000, 2)
        meta = chunk["metadata"]
        assert meta["samples"] == 96000 and meta["crossfade_seconds"] == 0.0
        assert meta["generated_at"] <= meta["sent_at"] <= time.time()

        ws.send(json.dumps(PROTOTYPE_UPDATE))
        status = recv_json(ws, "status")
        assert status["event"] == "updated" and status["update_applies_from_chunk"] >= 1
        target = status["update_applies_from_chunk"]
        while (chunk := recv_json(ws, "chunk"))["index"] < target:
            pass
        assert chunk["index"] == target

        ws.send(json.dumps({"type": "status"}))
        now = recv_json(ws, "status")
        assert now["temperature"] == 1.2 and now["topk"] == 64 and now["cfg"]["musiccoca"] == 1.0

        ws.send(json.dumps({"type": "ping"}))
        assert recv_json(ws, "pong")["time"] > 0
        ws.send(json.dumps({"type": "stop"}))
        stopped = recv_json(ws, "stopped")
        assert stopped["session_id"] == started["session_id"]


def test_a_client_stops_and_waits_for_the_answer_before_closing(ws_url):
    """`stop_and_wait` (our clients close only after the answer, so that Serve's proxy
    logs no error for the socket): `stopped` for a running session, at once an `error`
    when none runs, neither waiting out its timeout."""
    async def scenario() -> None:
        async with websockets.asyncio.client.connect(ws_url) as ws:
            answer = await asyncio.wait_for(stop_and_wait(ws, timeout=60), 30)
            assert answer["type"] == "error" and answer["error"].startswith("stop:")
            await ws.send(json.dumps({"type": "start", "binary_audio": True,
                                      "params": {"chunk_seconds": 0.2}}))
            while (started := json.loads(await ws.recv()))["type"] != "started":
                pass
            while not isinstance(await ws.recv(), bytes):  # audio under way
                pass
            answer = await asyncio.wait_for(stop_and_wait(ws, timeout=60), 30)
            assert answer == {**answer, "type": "stopped",
                              "session_id": started["session_id"]}

    asyncio.run(scenario())


def test_binary_wav_frames_are_followed_by_chunk_meta(ws_url):
    with connect(ws_url) as ws:
        ws.send(json.dumps({"type": "start", "binary_audio": True,
                            "params": {"styles": "techno", "chunk_seconds": 0.5}}))
        started = recv_json(ws)
        assert started["chunk_seconds"] == 0.48  # rounded to whole 40 ms frames
        payload, meta = recv_binary_chunk(ws)
        audio, rate = sf.read(io.BytesIO(payload), dtype="int16")
        assert audio.shape == (23040, 2) and rate == 48000
        assert meta["index"] == 0 and meta["metadata"]["audio_format"] == "wav"


def test_audio_is_sent_uncompressed_to_a_client_that_offers_deflate(ws_url):
    """Browsers always offer permessage-deflate; PCM does not compress, so the proxy
    declines it (deployments/proxy.py) and the audio still arrives whole."""
    with connect(ws_url, compression="deflate") as ws:
        assert "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        ws.send(json.dumps({"type": "start", "binary_audio": True, "audio_format": "pcm16",
                            "params": {"styles": "techno", "chunk_seconds": 0.2}}))
        recv_json(ws)
        payload, meta = recv_binary_chunk(ws)
        assert len(payload) == 5 * 1920 * 2 * 2 and meta["index"] == 0


def test_pcm16_one_frame_chunks_arrive_in_order_without_gaps(ws_url):
    with connect(ws_url) as ws:
        ws.send(json.dumps({"type": "start", "binary_audio": True, "audio_format": "pcm16",
                            "params": {"styles": "ambient", "chunk_seconds": 0.04,
                                       "notes": [60, 64], "drums": "on", "cfg_notes": 2.0,
                                       "cfg_drums": 3.0, "seed": 5}}))
        started = recv_json(ws)
        assert started["chunk_seconds"] == 0.04 and started["seed"] == 5
        for expected in range(30):
            payload, meta = recv_binary_chunk(ws)
            assert len(payload) == 1920 * 2 * 2  # raw little-endian int16, interleaved
            assert meta["index"] == expected
            assert meta["metadata"]["first_frame"] == expected


def test_bad_messages_get_errors_and_the_session_goes_on(ws_url):
    with connect(ws_url) as ws:
        ws.send(json.dumps({"type": "start", "params": {"styles": "funk",
                                                        "chunk_seconds": 0.2}}))
        assert recv_json(ws)["type"] == "started"
        bad = [
            ("this is not json", "message: not valid JSON"),
            # deeper than Python's JSON parser goes: it closed the socket
            ("[" * 100_000 + "]" * 100_000, "message: not valid JSON (nested too deeply)"),
            (json.dumps([1, 2]), "message: must be a JSON object"),
            (json.dumps({"type": "dance"}), "type: unknown message type 'dance'"),
            (json.dumps({"type": "x" * 5000}),  # quoted clipped, not whole
             f"type: unknown message type '{'x' * 56}... (5002 characters); expected"),
            (json.dumps({"type": "update", "topk": 0}), "topk:"),
            # true and false are no numbers (they were read as 1 and 0: top-k 1, pitch 1)
            (json.dumps({"type": "update", "topk": True}), "topk: must be a number, got true"),
            (json.dumps({"type": "update", "notes": [60, True]}),
             "notes: must be a comma-separated string or a list of MIDI pitches, got [60, True]"),
            (json.dumps({"type": "update", "temperature": "hot"}), "temperature:"),
            (json.dumps({"type": "update", "temperature": "hot", "topk": 0}),  # both named
             "; topk: Input should be greater than or equal to 1"),
            (json.dumps({"type": "update", "notes": [300]}), "notes: MIDI pitches"),
            (json.dumps({"type": "update", "chunk_seconds": 1}), "chunk_seconds: cannot change"),
            (json.dumps({"type": "update", "styles": "a", "style_weights": "1,2"}),
             "style_weights: got 2"),
            (json.dumps({"type": "start", "params": {}}), "start: a session is already running"),
            (json.dumps({"type": "consume"}), "chunk_index: consume needs the integer"),
            (json.dumps({"type": "consume", "chunk_index": 999}), "chunk_index: 999 has not"),
            (json.dumps({"type": "reseed"}), "loop_audio: required"),
            (json.dumps({"type": "ack", "index": "x"}), "index: ack needs"),
            # a negative index is no chunk's (they were taken silently)
            (json.dumps({"type": "ack", "index": -1}), "index: chunk indices start at 0, got -1"),
            (json.dumps({"type": "consume", "chunk_index": -1}),
             "chunk_index: chunk indices start at 0, got -1"),
            # params that are not an object (a reseed's closed the socket and its session)
            (json.dumps({"type": "reseed", "params": [1]}), "params: must be a JSON object"),
            (json.dumps({"type": "reseed_splice", "params": "x"}), "params: must be a JSON object"),
            (json.dumps({"type": "reseed_splice", "anchor_bars": True}),
             "anchor_bars: must be a number"),
            # a glide of 1e308 s overflowed its frame count and closed the socket
            (json.dumps({"type": "update", "styles": "a", "style_ramp_seconds": 1e308}),
             "style_ramp_seconds: Input should be less than or equal to 3600"),
            (json.dumps({"type": "update", "centroid_weights": [1, -1]}),  # not "style_weights"
             "centroid_weights: weights must be finite and >= 0, got [1.0, -1.0]"),
            # one reason for a field with a string and a JSON form, not one per form
            (json.dumps({"type": "update", "drums": "maybe"}),
             "drums: must be true, false, 'free', 'on' or 'off', got 'maybe'"),
            (json.dumps({"type": "update", "styles": 5}),
             "styles: must be a comma-separated string or a list of strings, got 5"),
            # JSON's NaN and Infinity, which Python's json reads
            ('{"type": "update", "temperature": NaN}', "temperature: Input should be a finite"),
            ('{"type": "update", "style_weights": [Infinity], "styles": ["a"]}',
             "style_weights: must be a comma-separated string or a list of finite numbers, "
             "got [inf]"),
            ('{"type": "update", "styles": "a", "style_weights": "nan"}',
             "style_weights: 'nan' is not a finite number"),
        ]
        for text, message in bad:
            ws.send(text)
            error = recv_json(ws, "error")
            assert error["type"] == "error" and message in error["error"], (text, error)
        ws.send(b"\x00\x01")
        assert "send JSON text" in recv_json(ws, "error")["error"]
        ws.send(json.dumps({"type": "status"}))
        status = recv_json(ws, "status")
        assert status["topk"] == 40 and status["temperature"] == 1.3  # untouched
        first = recv_json(ws, "chunk")["index"]
        assert recv_json(ws, "chunk")["index"] == first + 1  # still streaming


def test_start_errors_name_the_field(ws_url):
    with connect(ws_url) as ws:
        for message, expected in [
            ({"type": "start", "mode": "loop"}, "mode: must be one of ['rt', 'bar']"),
            ({"type": "start", "mode": "bar", "params": {"loop_audio_b64": "%%"}},
             "loop_audio_b64: not valid base64"),
            ({"type": "start", "mode": "bar", "params": {"loop_audio_b64": ""}},
             "loop_audio_b64: the upload is empty"),
            ({"type": "start", "mode": "bar", "params": {"bpm": 1000}}, "bpm: must be within"),
            ({"type": "start", "mode": "bar", "params": {"loudness_mode": "x"}},
             "loudness_mode: must be one of"),
            ({"type": "start", "audio_format": "mp3"}, "audio_format: must be one of"),
            ({"type": "start", "binary_audio": "no"},  # was read as true
             "binary_audio: must be true or false, got 'no'"),
            # named as this protocol names it (HTTP's is target_sample_rate)
            ({"type": "start", "mode": "bar", "params": {"target_sr": 7}},
             "target_sr: must be within 8000..192000 Hz, got 7"),
            ({"type": "start", "params": {"chunk_seconds": 0.01}}, "chunk_seconds:"),
            ({"type": "start", "params": {"pace": "warp"}}, "pace:"),
            ({"type": "start", "params": {"variant": "nope"}}, "variant: 'nope'"),
            ({"type": "update", "topk": 5}, "update: no session is running"),
            ({"type": "stop"}, "stop: no session is running"),
        ]:
            ws.send(json.dumps(message))
            assert expected in recv_json(ws, "error")["error"]


def test_params_the_server_does_not_use_are_listed_not_dropped_silently(ws_url):
    """A typo'd name, bar mode's params in an rt start, and fields beside `params` come
    back in `ignored_params` of `started` and of each `updated`; what was used is not."""
    with connect(ws_url) as ws:
        ws.send(json.dumps({"type": "start", "params": {
            "styles": "funk", "chunk_seconds": 0.2, "bpm": 100, "loop_weight": 0.5,
            "temprature": 0.5}, "seed": 7}))  # a field beside `params` is not read: listed
        started = recv_json(ws, "started")
        assert started["ignored_params"] == ["bpm", "loop_weight", "seed", "temprature"], started
        ws.send(json.dumps({"type": "update", "topk": 30, "tpok": 20}))
        updated = recv_json(ws, "status")
        assert updated["event"] == "updated" and updated["ignored_params"] == ["tpok"], updated
        ws.send(json.dumps({"type": "update", "params": {"topk": 31}}))
        assert recv_json(ws, "status")["ignored_params"] == []
        # both forms in one message: `params` is read, the fields beside it are listed
        ws.send(json.dumps({"type": "update", "params": {"temperature": 1.1}, "topk": 5}))
        assert recv_json(ws, "status")["ignored_params"] == ["topk"]
        ws.send(json.dumps({"type": "status"}))
        assert recv_json(ws, "status")["topk"] == 31
    # a start's params may be flat, as an update's (they were dropped silently)
    with connect(ws_url) as ws:
        ws.send(json.dumps({"type": "start", "binary_audio": True, "styles": "funk",
                            "chunk_seconds": 0.2, "topk": 33, "tpok": 1}))
        started = recv_json(ws, "started")
        assert started["ignored_params"] == ["tpok"] and started["chunk_seconds"] == 0.2
        assert started["binary_audio"] is True
        ws.send(json.dumps({"type": "status"}))
        assert recv_json(ws, "status")["topk"] == 33


def sessions_on_generator(serve_base) -> int:
    return httpx.get(f"{serve_base}/health", timeout=30).json()["variants"]["tiny"]["sessions"]


def sessions_left_after(serve_base, seconds: float = 10) -> int:
    """The generator's sessions once those of closed sockets are gone (a close is heard
    by the server a moment after the client's `close` returns), or after `seconds`."""
    deadline = time.monotonic() + seconds
    while sessions_on_generator(serve_base) and time.monotonic() < deadline:
        time.sleep(0.2)
    return sessions_on_generator(serve_base)


def test_disconnect_frees_the_session_at_once(ws_url, serve_base):
    # the test before closed its socket just now: its session may still be ending
    assert sessions_left_after(serve_base) == 0
    ws = connect(ws_url)
    ws.send(json.dumps({"type": "start", "params": {"styles": "x", "chunk_seconds": 0.2}}))
    assert recv_json(ws)["type"] == "started"
    assert sessions_on_generator(serve_base) == 1
    ws.close()
    assert sessions_left_after(serve_base) == 0


def test_two_sockets_share_one_batched_step(ws_url):
    with connect(ws_url) as a, connect(ws_url) as b:
        for ws in (a, b):
            ws.send(json.dumps({"type": "start", "params": {"styles": "x",
                                                            "chunk_seconds": 0.2}}))
            assert recv_json(ws)["type"] == "started"
        for ws in (a, b):  # past the first chunk + lead, which each generates as it starts
            while recv_json(ws, "chunk")["index"] < 6:
                pass
        for ws in (a, b):
            ws.send(json.dumps({"type": "status"}))
            status = recv_json(ws, "status")
            assert status["last_step_batch_size"] == 2 and status["sessions_on_replica"] == 2


def test_asap_with_an_ack_window_holds_back_until_the_client_acks(ws_url):
    with connect(ws_url) as ws:
        ws.send(json.dumps({"type": "start", "params": {
            "styles": "x", "pace": "asap", "chunk_seconds": 0.2, "window_chunks": 2}}))
        assert recv_json(ws)["window_chunks"] == 2
        assert [recv_json(ws, "chunk")["index"] for _ in range(2)] == [0, 1]
        with pytest.raises(TimeoutError):  # the window is full: nothing more is sent
            recv_json(ws, "chunk", timeout=1.5)
        ws.send(json.dumps({"type": "status"}))
        status = recv_json(ws, "status")
        assert status["last_sent"] == 1 and status["flow_waits"] >= 1
        # generation paused too: at most the stream's credit and the generator's backlog
        # (4) beyond what was sent
        assert status["chunks_generated"] <= 2 + STREAM_CREDIT_CHUNKS + 4
        ws.send(json.dumps({"type": "ack", "index": 9}))
        assert "index: chunk 9 has not been sent" in recv_json(ws, "error")["error"]
        ws.send(json.dumps({"type": "ack", "index": 1}))
        assert [recv_json(ws, "chunk")["index"] for _ in range(2)] == [2, 3]


def test_asap_without_acks_never_runs_further_ahead_than_the_lead_cap(ws_url):
    """A client that reads nothing: the server stops at ws_max_lead_seconds (4 s here)
    ahead of the wall clock, instead of filling the proxy with audio."""
    with connect(ws_url) as ws:
        t0 = time.monotonic()
        ws.send(json.dumps({"type": "start", "params": {
            "styles": "x", "pace": "asap", "chunk_seconds": 0.4}}))
        time.sleep(3.0)  # tiny makes ~6 s of audio per second: unbounded, this sends ~18 s
        ws.send(json.dumps({"type": "status"}))
        received = 0.0
        while True:
            message = recv_json(ws)
            if message["type"] == "status":
                break
            if message["type"] == "chunk":
                received += message["metadata"]["seconds"]
        elapsed = time.monotonic() - t0
        assert 0 < received <= elapsed + 4.0 + 0.4
        # what was sent, the stream's credit and the generator's backlog (4)
        assert message["chunks_generated"] <= message["last_sent"] + 1 + STREAM_CREDIT_CHUNKS + 4


def test_bar_mode_jams_on_a_loop_with_consume_reseed_and_splice(ws_url):
    from .test_loops import LOOP

    loop_b64 = base64.b64encode(LOOP).decode()
    with connect(ws_url, max_size=None) as ws:  # a 4.5 s bar in base64 WAV exceeds 1 MiB
        ws.send(json.dumps({"type": "start", "mode": "bar", "params": {
            "styles": "funk", "loop_audio_b64": loop_b64, "bpm": 93.7, "beats_per_bar": 7,
            "bars_per_chunk": 1, "target_sr": 44100, "loudness_mode": "auto",
            "headroom_db": 1.0, "pace": "asap", "loop_weight": 0.5}}))
        started = recv_json(ws)
        assert started["type"] == "started" and started["mode"] == "bar", started
        assert started["sample_rate"] == 44100 and started["prefill_frames"] == 25
        bar = 7 * 60 / 93.7
        for k in range(2):
            chunk = recv_json(ws, "chunk")
            audio, rate = sf.read(io.BytesIO(base64.b64decode(chunk["audio_base64"])))
            assert chunk["index"] == k and rate == 44100
            assert audio.shape[0] == round((k + 1) * bar * 44100) - round(k * bar * 44100)
            assert chunk["metadata"]["first_bar"] == k and "loudness" in chunk["metadata"]
            ws.send(json.dumps({"type": "consume", "chunk_index": k}))
        ws.send(json.dumps({"type": "reseed", "loop_audio_b64": loop_b64}))
        reseeded = recv_json(ws, "status")
        assert reseeded["event"] == "reseed" and reseeded["context_frames"] == 25
        ws.send(json.dumps({"type": "reseed_splice", "loop_audio_b64": loop_b64,
                            "anchor_bars": 0.1}))
        spliced = recv_json(ws, "status")
        assert spliced["event"] == "reseed_splice" and spliced["anchor_frames"] == 11
        ws.send(json.dumps({"type": "reseed", "loop_audio_b64": "%%%"}))
        assert "loop_audio_b64: not valid base64" in recv_json(ws, "error")["error"]
        # 70 s of 16-bit WAV, 17.9 MB as base64: over uvicorn's default 16 MiB message,
        # which closed the socket (1009) and the session on it; now an error names it
        too_long = io.BytesIO()
        sf.write(too_long, np.zeros((70 * 48000, 2), np.int16), 48000, format="WAV")
        ws.send(json.dumps({"type": "reseed",
                            "loop_audio_b64": base64.b64encode(too_long.getvalue()).decode()}))
        assert "70.0 s is longer than the 60 s allowed" in recv_json(ws, "error")["error"]
        ws.send(json.dumps({"type": "consume", "chunk_index": "two"}))
        assert "chunk_index:" in recv_json(ws, "error")["error"]
        ws.send(json.dumps({"type": "status"}))
        status = recv_json(ws, "status")  # the session goes on
        assert status["session_id"] == started["session_id"] and status["frames_forced"] >= 25


def test_jam_cli_records_a_wav_with_a_scripted_style_change(serve_base, tmp_path):
    out = tmp_path / "jam.wav"
    result = subprocess.run(
        [str(BIN / "mrt-serve"), "jam", "--url", serve_base.replace("http", "ws"),
         "--styles", "ambient, techno", "--seconds", "3", "--chunk-seconds", "0.4",
         "--update-at", "1", "--update-styles", "jazz", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[0])
    assert summary["seconds"] == 3.0 and summary["chunks"] == 8
    assert summary["update_applies_from_chunk"] >= 2
    assert summary["update_to_effect_ms"] > 0 and summary["time_to_first_chunk_ms"] > 0
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.frames) == (48000, 2, 3 * 48000)
    assert "jamming" in result.stderr  # the progress bar


def test_the_generator_writes_no_log_line_per_chunk(ws_url):
    """The Ingress logs the client's requests; the Generator's callers are our own, so a
    line per chunk there is noise (two a second per session at 0.5 s chunks)."""
    import ray

    with connect(ws_url) as ws:
        ws.send(json.dumps({"type": "start", "binary_audio": True, "audio_format": "pcm16",
                            "params": {"styles": "ambient", "chunk_seconds": 0.04}}))
        recv_json(ws)
        for _ in range(10):
            recv_binary_chunk(ws)
        ws.send(json.dumps({"type": "stop"}))
    logs = pathlib.Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    generator_logs = sorted(logs.glob("replica_*Generator_*.log"))
    assert generator_logs, sorted(p.name for p in logs.iterdir())
    time.sleep(1)  # Serve buffers request logs briefly before writing them
    for path in generator_logs:  # an access line reads "... -- CALL next_chunk OK 2.1ms"
        assert "CALL next_chunk" not in path.read_text(), path.name


def test_the_ingress_served_all_of_this_without_jax(ws_url):
    """Last in the last module on the shared app: after renders, polled and WebSocket jams,
    bar mode's reseeds and bad input, the ingress has not loaded JAX. It parses, checks
    and relays and never runs a model; with JAX it took twice the memory (445 -> 213 MB
    resident on the dev box) and twice as long to import. The generator has it (what
    shows this test can tell)."""
    ingresses, generators = replica_processes("Ingress"), replica_processes("Generator_tiny")
    assert ingresses and generators
    assert all("jaxlib" in maps for maps in generators.values())
    assert not [pid for pid, maps in ingresses.items() if "jaxlib" in maps]

