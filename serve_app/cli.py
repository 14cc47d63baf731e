"""`mrt-serve` command line: offline rendering, a WebSocket jam client, and the API served
from one process without Ray."""

from __future__ import annotations

import argparse
import pathlib
import sys

from . import logs
from .cli_args import finite, integer, seconds


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .audio import write_wav
    from .engine import Controls, load_model
    from .render import RenderRequest, render
    from .styles.prompts import parse_floats, parse_styles

    try:
        request = RenderRequest(
            styles=parse_styles(args.styles, args.style_weights),
            seconds=args.seconds,
            seed=args.seed,
            controls=Controls(
                temperature=args.temperature,
                top_k=args.topk,
                cfg={"musiccoca": args.guidance, "notes": args.cfg_notes, "drums": args.cfg_drums},
                drums=args.drums,
            ),
            notes=[int(n) for n in parse_floats(args.notes, "notes")] if args.notes else None,
            mean=args.mean,
            centroid_weights=parse_floats(args.centroid_weights, "centroid_weights"),
        )
        frames = request.frames
        request.controls.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with tqdm(total=3, desc="loading model", unit="step", leave=False) as bar:
        loaded = load_model(args.variant, repo=args.repo, step=args.step)
        bar.update(3)
    with tqdm(total=frames, desc=f"generating {args.seconds:g}s", unit="frame") as bar:
        audio = render(loaded, request, on_frame=lambda _: bar.update(1))
    write_wav(args.out, audio)
    print(f"wrote {args.out} ({audio.shape[0] / 48000:.2f} s, 48 kHz stereo)")
    return 0


def _jam(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from .audio import write_wav
    from .client import JamError, api_key_headers, run

    params = {"styles": args.styles, "style_weights": args.style_weights,
              "temperature": args.temperature, "topk": args.topk,
              "guidance_weight": args.guidance, "chunk_seconds": args.chunk_seconds,
              "pace": args.pace, "seed": args.seed, "variant": args.variant}
    params = {k: v for k, v in params.items() if v is not None}
    update = None
    if args.update_at is not None:
        update = {"styles": args.update_styles, "style_ramp_seconds": args.update_ramp}
        update = {k: v for k, v in update.items() if v is not None}
    with tqdm(total=args.seconds, desc="jamming", unit="s",
              bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s") as bar:
        try:
            rec = run(args.url, params, args.seconds, update_at=args.update_at, update=update,
                      on_audio=lambda s: bar.update(min(s, bar.total - bar.n)),
                      headers=api_key_headers(args.api_key))
        except (JamError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    write_wav(args.out, rec.audio)
    print(json.dumps(rec.summary()))
    print(f"wrote {args.out} ({rec.audio.shape[0] / 48000:.2f} s, 48 kHz stereo)")
    return 0


def _local(args: argparse.Namespace) -> int:
    from .standalone import serve

    try:
        serve(args.config, app_name=args.app, host=args.host, port=args.port,
              random_weights=args.random_weights, variants=args.variants)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrt-serve", description=__doc__)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="render a style prompt to a WAV file, no server")
    gen.add_argument("--variant", default="mrt2_base", help="tiny, mrt2_small or mrt2_base")
    gen.add_argument("--repo", default=None, help="Hub repo id or local directory")
    gen.add_argument("--step", type=integer(0), default=None, help="finetune checkpoint step")
    gen.add_argument("--styles", default="", help='comma-separated, e.g. "disco funk, strings"')
    gen.add_argument("--style-weights", default=None, help='e.g. "1.0, 0.5"')
    gen.add_argument("--mean", type=finite, default=0.0, help="weight of the finetune mean style")
    gen.add_argument("--centroid-weights", default=None, help="weights of finetune centroids")
    gen.add_argument("--seconds", type=seconds(), default=8.0)
    gen.add_argument("--seed", type=integer(0), default=0)
    gen.add_argument("--temperature", type=finite, default=1.3)
    gen.add_argument("--topk", type=integer(1), default=40)
    gen.add_argument("--guidance", type=finite, default=3.0, help="style CFG scale")
    gen.add_argument("--cfg-notes", type=finite, default=1.0)
    gen.add_argument("--cfg-drums", type=finite, default=1.0)
    gen.add_argument("--notes", default=None, help="held MIDI pitches, e.g. 60,64,67")
    gen.add_argument("--drums", default="free", choices=["free", "on", "off"])
    gen.add_argument("--out", type=pathlib.Path, required=True)
    gen.set_defaults(func=_generate)

    jam = sub.add_parser("jam", help="record a real-time jam from a running server")
    jam.add_argument("--url", default="ws://127.0.0.1:8000")
    jam.add_argument("--styles", default="")
    jam.add_argument("--style-weights", default=None)
    jam.add_argument("--seconds", type=seconds(), default=20.0)
    jam.add_argument("--chunk-seconds", type=seconds(), default=None)
    jam.add_argument("--pace", choices=["realtime", "asap"], default=None)
    jam.add_argument("--temperature", type=finite, default=None)
    jam.add_argument("--topk", type=integer(1), default=None)
    jam.add_argument("--guidance", type=finite, default=None)
    jam.add_argument("--seed", type=integer(0), default=None)
    jam.add_argument("--variant", default=None)
    jam.add_argument("--update-at", type=seconds(zero=True), default=None,
                     help="seconds of received audio after which to send the update")
    jam.add_argument("--update-styles", default=None)
    jam.add_argument("--update-ramp", type=seconds(zero=True), default=None)
    jam.add_argument("--api-key", default=None)
    jam.add_argument("--out", type=pathlib.Path, required=True)
    jam.set_defaults(func=_jam)

    local = sub.add_parser(
        "local", help="serve a config's application from this one process, without Ray",
        description="The same API and config files as `scripts/serve`, with every variant "
                    "in this process: for one machine, and to measure what Ray's hops cost. "
                    "Replicas, autoscaling and GPU/CPU counts in the config are ignored.")
    local.add_argument("config", nargs="?", default="configs/tiny.yaml")
    local.add_argument("--app", default=None, help="application name (default: the first)")
    local.add_argument("--host", default=None, help="default: the config's http_options")
    local.add_argument("--port", type=integer(1), default=None,
                       help="default: the config's, or 8000")
    local.add_argument("--variant", action="append", default=[], dest="variants",
                       metavar="NAME", help="serve only this variant of the config "
                                            "(repeatable; default: every variant)")
    local.add_argument("--random-weights", action="store_true",
                       help="read no checkpoint files: random model weights and mock style "
                            "embeddings (benchmarks on a bare machine: speed does not depend "
                            "on weight values)")
    local.set_defaults(func=_local)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
