#!/usr/bin/env python3
"""End-to-end serving benchmark: N concurrent real-time WebSocket jams against a server.

    scripts/bench_serve.py --url ws://HOST:PORT --sessions 1,2,4 --seconds 20 \
        --chunk-seconds 0.5 --json bench-results/serve.json [--png F] [--variant V] \
        [--api-key K] [--wait-ready SECONDS] [--loop-seconds S [--bpm B] [--bars-per-chunk N]]

`--loop-seconds` makes every session a bar-mode jam on a loop of that length, as
the prototype's app jams: chunks of one bar (or `--bars-per-chunk`) at `--bpm`,
loudness matched to the loop (`--chunk-seconds` does not apply).

Each session is what a musician's app does: start a `realtime` jam, play chunks as
they come, and halfway through send a style update. Per session it measures, with
the client's clock (same machine as the server for the overhead figure):

- underruns: a player starts when chunk 0 arrives and plays each chunk for its
  length; a chunk that arrives after the audio before it ran out is an underrun
  (and the player waits for it, as a real one would);
- time to first audio: `start` sent -> chunk 0 received;
- update latency: `update` sent -> the chunk holding the first frame generated
  with the new style (`update_applies_from_chunk`) received;
- serving overhead: chunk received (client wall clock) - the moment the server
  generated its last frame (`metadata.generated_at`): everything after the engine,
  i.e. chunking, encoding, Ray Serve hops, WebSocket; split at the ingress's
  `metadata.sent_at` into generator -> ingress and ingress -> proxy -> client.

Per run it also reads the generator's own figures from `/health` before and after:
its steps, their mean time, the rows (sessions) they carried and the share slower
than the 40 ms frame each one makes, i.e. the engine figure the underruns follow
from, added up over the variant's replicas (those up both before and after).

Every session names the variant (`--variant`, or the server's default): a server's A/B
split would otherwise spread them over several generators. Runs go from the smallest N
up; the JSON holds every run and the largest N held with zero underruns; the PNG plots
them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import pathlib
import statistics
import sys
import time
import urllib.request

import numpy as np
from websockets.asyncio.client import connect

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from serve_app.audio import to_int16, to_wav_bytes
from serve_app.audio.barclock import BarClock
from serve_app.audio.synth import synth_loop
from serve_app.cli_args import finite, integer, positive_ints, seconds
from serve_app.client import api_key_headers, stop_and_wait, ws_url
from serve_app.frames import FRAMES_PER_SECOND

FRAME_MS = str(1000 // FRAMES_PER_SECOND)  # a bound of the server's step-time histogram

STYLES = ("synthwave", "acid jazz")


@dataclasses.dataclass
class SessionResult:
    chunks: int = 0
    underruns: int = 0
    time_to_first_audio_ms: float | None = None
    update_latency_ms: float | None = None
    overhead_ms: list[float] = dataclasses.field(default_factory=list)
    to_ingress_ms: list[float] = dataclasses.field(default_factory=list)
    variant: str | None = None  # the generator that served it, from `started`
    mode: str | None = None  # rt or bar, from `started`
    chunk_seconds: float | None = None  # the first chunk's length, as the server cut it
    moves: int = 0  # times the stream moved to another replica (its own stopped)
    error: str | None = None


@dataclasses.dataclass
class BarLoop:
    """Bar mode: the loop every session jams on (WAV, base64), in 4/4 at `bpm`."""

    wav_b64: str
    clock: BarClock
    bars_per_chunk: int = 1

    @classmethod
    def synth(cls, seconds: float, bpm: float, bars_per_chunk: int = 1) -> BarLoop:
        """The suite's kick-and-chord loop (serve_app/audio/synth.py), 48 kHz stereo."""
        mono = synth_loop(seconds, 48000, bpm, level=0.2)
        wav = to_wav_bytes(to_int16(np.stack([mono, mono], 1)), 48000)
        return cls(base64.b64encode(wav).decode(), BarClock(bpm, 4), bars_per_chunk)

    @property
    def chunk_seconds(self) -> float:
        return float(self.bars_per_chunk * self.clock.seconds_per_bar)

    def params(self) -> dict:
        return {"loop_audio_b64": self.wav_b64, "bpm": self.clock.bpm,
                "beats_per_bar": self.clock.beats_per_bar,
                "bars_per_chunk": self.bars_per_chunk, "loudness_mode": "auto"}


async def jam(url: str, seconds: float, chunk_seconds: float, seed: int,
              variant: str | None, binary: bool = True, delay: float = 0.0,
              api_key: str | None = None, loop: BarLoop | None = None) -> SessionResult:
    result = SessionResult()
    await asyncio.sleep(delay)
    params = {"styles": STYLES[0], "pace": "realtime", "chunk_seconds": chunk_seconds,
              "seed": seed, **({"variant": variant} if variant else {}),
              **(loop.params() if loop else {})}
    try:
        # PCM does not compress: permessage-deflate would only cost time (~5 ms a 0.5 s
        # chunk on the dev box), so this client, like ours, does not offer it.
        async with connect(url, max_size=None, compression=None,
                           additional_headers=api_key_headers(api_key)) as ws:
            sent_at = time.monotonic()
            await ws.send(json.dumps({"type": "start", "mode": "bar" if loop else "rt",
                                      "binary_audio": binary,
                                      "audio_format": "pcm16", "params": params}))
            audio_runs_out = None  # client monotonic time the buffered audio ends
            first_at = None
            update_sent = update_chunk = None
            audio_at = None  # (monotonic, wall) arrival of the last binary audio frame
            while True:
                raw = await ws.recv()
                if isinstance(raw, bytes):
                    # the audio is playable now; its chunk_meta follows with the timing
                    audio_at = (time.monotonic(), time.time())
                    continue
                message = json.loads(raw)
                kind = message.get("type")
                if kind == "error":
                    result.error = message["error"]
                    return result
                if kind == "started":
                    result.variant, result.mode = message.get("variant"), message.get("mode")
                    continue
                if kind == "status" and message.get("event") == "updated":
                    update_chunk = message["update_applies_from_chunk"]
                    continue
                if kind == "status" and message.get("event") == "moved":
                    result.moves += 1
                    continue
                if kind not in ("chunk_meta", "chunk"):
                    continue
                now, wall = audio_at if kind == "chunk_meta" and audio_at else (
                    time.monotonic(), time.time())
                meta, index = message["metadata"], message["index"]
                result.chunks += 1
                result.overhead_ms.append(1000 * (wall - meta["generated_at"]))
                # split: generator -> ingress sending it; the rest is proxy + socket
                result.to_ingress_ms.append(1000 * (meta["sent_at"] - meta["generated_at"]))
                length = meta["seconds"]
                if first_at is None:
                    first_at = now
                    result.chunk_seconds = length
                    result.time_to_first_audio_ms = 1000 * (now - sent_at)
                    audio_runs_out = now + length
                elif now > audio_runs_out:
                    result.underruns += 1
                    audio_runs_out = now + length
                else:
                    audio_runs_out += length
                if update_chunk is not None and index >= update_chunk:
                    result.update_latency_ms = 1000 * (now - update_sent)
                    update_chunk = None  # measured once
                if update_sent is None and now - first_at >= seconds / 2:
                    update_sent = time.monotonic()
                    await ws.send(json.dumps({"type": "update", "styles": STYLES[1]}))
                if now - first_at >= seconds:
                    await stop_and_wait(ws)
                    return result
    except Exception as e:  # a failed session is a result, not a crash of the benchmark
        result.error = f"{type(e).__name__}: {e}"
        return result


def server_health(url: str, api_key: str | None) -> dict | None:
    """The server's /health (None when it does not answer)."""
    base = "http" + url.removesuffix("/ws/jam")[2:]  # ws -> http, wss -> https
    request = urllib.request.Request(base + "/health", headers=api_key_headers(api_key))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


def variant_entry(health: dict, variant: str | None) -> dict | None:
    """The variant's generator entry of a /health answer (None: not served there)."""
    return health.get("variants", {}).get(variant or health.get("default_variant"))


def generator_health(url: str, variant: str | None, api_key: str | None) -> dict | None:
    """The variant's generator entry of /health (None when the server cannot say)."""
    return variant_entry(server_health(url, api_key) or {}, variant)


def wait_until_ready(url: str, variant: str | None, api_key: str | None,
                     timeout: float) -> None:
    """Waits for the variant's generator to take sessions, saying where it stands every
    15 s: a server just started loads and compiles every batch bucket first (seconds for
    tiny, minutes for mrt2_base), and a run started before would only measure refusals.
    Exits naming the reason when the variant failed, is not served, or is not ready in
    `timeout` seconds."""
    started = time.monotonic()
    said = started
    name = variant or "the default variant"
    while True:
        health = server_health(url, api_key)
        if health is None:
            state = "no answer from /health"
        else:
            entry = variant_entry(health, variant)
            if entry is None:
                raise SystemExit(f"--variant: {name!r} is not served here "
                                 f"({sorted(health.get('variants', {}))})")
            state = entry.get("state")
            if state == "ready":
                print(f"  {name} ready after {time.monotonic() - started:.0f} s",
                      file=sys.stderr, flush=True)
                return
            if state == "error":
                raise SystemExit(f"--wait-ready: {name} failed to start: {entry.get('error')}")
        waited = time.monotonic() - started
        if waited > timeout:
            raise SystemExit(f"--wait-ready: {name} not ready after {timeout:g} s ({state})")
        if time.monotonic() - said >= 15:
            print(f"  waiting for {name}: {state} ({waited:.0f} s)", file=sys.stderr,
                  flush=True)
            said = time.monotonic()
        time.sleep(1)


def step_figures(before: dict | None, after: dict | None) -> dict | None:
    """The generator's steps between two /health snapshots, from each replica's
    cumulative step-time histogram, added up over the replicas in both (None: no
    such replica, or no steps between)."""
    if not before or not after:
        return None
    earlier = {r["replica"]: r["metrics"] for r in replica_reports(before)}
    pairs = {r["replica"]: (earlier[r["replica"]], r["metrics"]) for r in replica_reports(after)
             if r["replica"] in earlier and "mrt_step_ms_le" in r["metrics"]}
    if not pairs:  # other replicas, or a server without the histogram in /health
        return None

    def added(key) -> float:
        return sum(key(a) - key(b) for b, a in pairs.values())

    steps = added(lambda m: m["mrt_step_ms_le"]["+Inf"])
    if steps <= 0:
        return None
    in_time = (added(lambda m: m["mrt_step_ms_le"][FRAME_MS])
               if all(FRAME_MS in a["mrt_step_ms_le"] for _, a in pairs.values()) else None)
    return {
        "replicas": sorted(pairs),
        "steps": steps,
        "step_ms_mean": round(added(lambda m: m["mrt_step_ms_sum"]) / steps, 2),
        "rows_per_step_mean": round(added(lambda m: m["mrt_frames"]) / steps, 2),
        # each step slower than the frame it makes puts its sessions further behind
        "steps_over_frame_share": round(1 - in_time / steps, 4) if in_time is not None else None,
        # host work per step on the step loop: handing frames out, cutting chunks
        "handout_ms_mean": (round(added(lambda m: m["mrt_handout_ms_sum"]) / steps, 3)
                            if all("mrt_handout_ms_sum" in a for _, a in pairs.values())
                            else None),
    }


def replica_reports(variant: dict) -> list[dict]:
    """Each replica's own report (a server from before `replicas` has one, the variant)."""
    return variant.get("replicas") or [variant]


def p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


async def run(url: str, sessions: int, seconds: float, chunk_seconds: float,
              variant: str | None, binary: bool = True, stagger: bool = False,
              api_key: str | None = None, loop: BarLoop | None = None) -> dict:
    # Staggered, session i starts i/N of a chunk after the first, as musicians who do
    # not press start together would; otherwise all start at once, so their chunks fall
    # due in the same step and queue behind each other on the way out (the worst case).
    delays = [i * chunk_seconds / sessions if stagger else 0.0 for i in range(sessions)]
    before = await asyncio.to_thread(generator_health, url, variant, api_key)
    results = await asyncio.gather(*(jam(url, seconds, chunk_seconds, 1000 + i, variant,
                                         binary, delays[i], api_key, loop)
                                     for i in range(sessions)))
    after = await asyncio.to_thread(generator_health, url, variant, api_key)
    overheads = [v for r in results for v in r.overhead_ms]
    to_ingress = [v for r in results for v in r.to_ingress_ms]
    return {
        "sessions": sessions,
        "staggered": stagger,
        "underruns": sum(r.underruns for r in results),
        "failed_sessions": sum(r.error is not None for r in results),
        "moved_sessions": sum(r.moves > 0 for r in results),
        "errors": sorted({r.error for r in results if r.error}),
        "chunks": sum(r.chunks for r in results),
        "time_to_first_audio_ms_p50": p50([r.time_to_first_audio_ms for r in results
                                           if r.time_to_first_audio_ms is not None]),
        "update_latency_ms_p50": p50([r.update_latency_ms for r in results
                                      if r.update_latency_ms is not None]),
        "overhead_ms_p50": p50(overheads),
        "overhead_ms_p90": (round(statistics.quantiles(overheads, n=10)[-1], 2)
                            if len(overheads) >= 2 else None),
        "generator_to_ingress_ms_p50": p50(to_ingress),
        "generator_steps": step_figures(before, after),
        "per_session": [dataclasses.asdict(r) | {"overhead_ms": p50(r.overhead_ms),
                                                 "to_ingress_ms": p50(r.to_ingress_ms)}
                        for r in results],
    }


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    n = [r["sessions"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar([str(x) for x in n], [r["underruns"] for r in runs], color="tab:red")
    left.set_xlabel("concurrent realtime sessions")
    left.set_ylabel("underruns (all sessions)")
    left.set_title(f"held with zero underruns: {report['max_sessions_zero_underruns']}")
    for key, label in (("time_to_first_audio_ms_p50", "time to first audio"),
                       ("update_latency_ms_p50", "update latency"),
                       ("overhead_ms_p50", "serving overhead")):
        right.plot(n, [r[key] for r in runs], marker="o", label=label)
    right.set_xlabel("concurrent realtime sessions")
    right.set_ylabel("ms (median)")
    right.set_yscale("log")
    right.legend()
    fig.suptitle(f"{report['url']}  chunk {report['chunk_seconds']} s, {report['seconds']} s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="ws://HOST:PORT (or the /ws/jam URL)")
    parser.add_argument("--sessions", type=positive_ints, default="1,2,4",
                        help="comma-separated session counts")
    parser.add_argument("--seconds", type=seconds(), default=20.0)
    parser.add_argument("--chunk-seconds", type=seconds(), default=0.5)
    parser.add_argument("--variant", default=None)
    parser.add_argument("--audio", choices=("binary", "json"), default="binary",
                        help="binary frames + chunk_meta (default), or base64 in one JSON")
    parser.add_argument("--stagger", action="store_true",
                        help="start session i i/N of a chunk after the first (default: all "
                             "at once, so every session's chunk is ready in the same step)")
    parser.add_argument("--api-key", default=None,
                        help="sent as X-API-Key, for a server with API keys configured")
    parser.add_argument("--wait-ready", type=seconds(zero=True), default=0, metavar="SECONDS",
                        help="first wait up to this long for the variant to be ready (a "
                             "server just started compiles its buckets; default: no wait)")
    parser.add_argument("--loop-seconds", type=seconds(), default=None,
                        help="bar-mode jams on a synthesized loop this long, one bar a chunk")
    parser.add_argument("--bpm", type=finite, default=120.0, help="the loop's tempo (bar mode)")
    parser.add_argument("--bars-per-chunk", type=integer(1), default=1,
                        help="bars in each chunk (bar mode; default 1)")
    parser.add_argument("--json", type=pathlib.Path, required=True)
    parser.add_argument("--png", type=pathlib.Path, default=None)
    args = parser.parse_args()
    counts = args.sessions
    if args.loop_seconds is not None and args.loop_seconds > 600:
        parser.error("--loop-seconds: within 0..600 seconds")
    loop = (BarLoop.synth(args.loop_seconds, args.bpm, args.bars_per_chunk)
            if args.loop_seconds else None)
    if loop is not None:
        args.chunk_seconds = loop.chunk_seconds
    url = ws_url(args.url)
    if args.wait_ready > 0:
        wait_until_ready(url, args.variant, args.api_key, args.wait_ready)
    health = server_health(url, args.api_key) or {}
    if args.variant is None:
        # Every session names one variant: with none, a server's A/B split would spread
        # them over several generators, and the run would not say what one generator
        # holds (nor match the one generator whose steps are read from /health).
        args.variant = health.get("default_variant")
        print(f"  variant: {args.variant or 'unknown'} (the server's default)",
              file=sys.stderr, flush=True)
    # Where the generator computes (JAX's device, from /health): a figure taken on a GPU
    # box from a server that fell back to CPU must not pass for a GPU figure.
    entry = variant_entry(health, args.variant) or {}
    device, random_weights = entry.get("device"), entry.get("random_weights")
    print(f"  generator device: {device or 'unknown'}"
          f"{', random weights' if random_weights else ''}", file=sys.stderr, flush=True)
    report = {"url": url, "seconds": args.seconds, "chunk_seconds": args.chunk_seconds,
              "variant": args.variant, "audio": args.audio, "staggered": args.stagger,
              "mode": "bar" if loop else "rt", "loop_seconds": args.loop_seconds,
              "bpm": args.bpm if loop else None,
              "bars_per_chunk": loop.bars_per_chunk if loop else None,
              "device": device, "random_weights": random_weights, "runs": []}
    print(f"{'sessions':>8} {'underruns':>9} {'failed':>6} {'ttfa ms':>8} {'update ms':>9} "
          f"{'overhead ms':>11} {'step ms':>7} {'rows':>5} {'steps > ' + FRAME_MS + ' ms':>13} "
          f"{'handout ms':>10}",
          flush=True)
    for n in counts:
        print(f"  running {n} session(s) for {args.seconds:g} s ...", file=sys.stderr,
              flush=True)
        r = asyncio.run(run(url, n, args.seconds, args.chunk_seconds, args.variant,
                            args.audio == "binary", args.stagger, args.api_key, loop))
        report["runs"].append(r)
        steps = r["generator_steps"] or {}
        late = steps.get("steps_over_frame_share")
        print(f"{n:>8} {r['underruns']:>9} {r['failed_sessions']:>6} "
              f"{r['time_to_first_audio_ms_p50']!s:>8} {r['update_latency_ms_p50']!s:>9} "
              f"{r['overhead_ms_p50']!s:>11} {steps.get('step_ms_mean')!s:>7} "
              f"{steps.get('rows_per_step_mean')!s:>5} "
              f"{'None' if late is None else f'{100 * late:.1f}%':>13} "
              f"{steps.get('handout_ms_mean')!s:>10}", flush=True)
        for error in r["errors"]:
            print(f"  error: {error}", file=sys.stderr)
    held = [r["sessions"] for r in report["runs"]
            if r["underruns"] == 0 and r["failed_sessions"] == 0]
    report["max_sessions_zero_underruns"] = max(held) if held else 0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    png = args.png or args.json.with_suffix(".png")
    plot(report, png)
    print(f"max sessions with zero underruns: {report['max_sessions_zero_underruns']}; "
          f"wrote {args.json} and {png}")
    if all(r["failed_sessions"] == r["sessions"] for r in report["runs"]):
        # nothing was measured (no server, a wrong key, ...): not a result of 0 sessions
        print("error: no session ran in any run (their errors are above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
