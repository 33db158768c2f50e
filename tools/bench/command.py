"""`chorus bench`: a load sweep through the gateway, bounded in time and count, on loopback.

By default it starts the stack `chorus serve` would (tools.supervisor, the same thread
split and defaults), runs each concurrency level, and stops it; `--gateway` points it at
a stack already running on this machine instead. With `--ceiling` it first measures the
machine's ceiling (tools/bench/ceiling.py) at the same concurrency levels, before the
services start, so that the table puts Chorus beside its denominator from one run, and
N*: the largest level whose ceiling is at least 1.15x its streams.

Each level runs `--repeat` times back to back on the same started stack (a fresh
stack per run would measure start-up calibration as much as serving), and each
ceiling combination as many times: a single run on a shared machine moves as much as
the effects being measured. Figures are median [min-max] over the runs; the median
run of a level (report.LevelRuns) stands for it where one run is needed.

It writes `bench.json` (every run's figures, every request's chunk arrivals) and PNG
plots (the median run's chunk-arrival timeline per level, TTFA and audio s/s against
concurrency) into `--out`, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import sys
from dataclasses import asdict
from pathlib import Path

from chorus.realtime.playback import DEFAULT_START_BUFFER_S
from tools.bench.ceiling import add_common_arguments
from tools.bench.load import FAMILIES

LOOPBACK_NAMES = {"localhost"}


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=__doc__.splitlines()[0])
    p.add_argument("--gateway", default=None,
                   help="a running gateway on this machine (loopback only); default: start a stack")
    p.add_argument("--models", type=Path, default=Path("models/demo"),
                   help="models folder for the stack it starts (default models/demo, demo models built if empty)")
    p.add_argument("--levels", default="1,2,4,8", help="concurrency levels (default 1,2,4,8)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default: 4 per stream of the level, at least 8)")
    p.add_argument("--family", choices=sorted(FAMILIES), default="orpheus",
                   help="the model family to load: neutts-air starts the stack with the NeuTTS-Air family too "
                        "(as `chorus serve` does) and speaks its demo voice; --ceiling then measures its models "
                        "(default orpheus)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per request, fixed (default: 5.12 s, 60 SNAC frames or 256 NeuCodec frames)")
    p.add_argument("--max-seconds", type=float, default=120.0,
                   help="per level: no new request starts after this (default 120)")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline of each request in seconds")
    p.add_argument("--start-buffer-ms", type=float, default=DEFAULT_START_BUFFER_S * 1000,
                   help="listener's start buffer for the held-real-time figures (default 150)")
    p.add_argument("--ceiling", action="store_true",
                   help="measure the machine's ceiling at the same levels first, in the same run")
    p.add_argument("--ceiling-seconds", type=float, default=4.0, help="measured seconds per ceiling trial")
    add_common_arguments(p)
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="folder for bench.json and the plots")
    p.add_argument("--stack-arg", action="append", default=[], metavar="FLAG=VALUE",
                   help="passed to `chorus serve`'s stack as a Stack field, e.g. --stack-arg llama_threads=2")
    p.set_defaults(func=run_bench)


def _levels(text: str) -> list[int]:
    levels = sorted({int(x) for x in text.split(",") if x.strip()})
    if not levels or levels[0] < 1 or levels[-1] > 256:
        raise SystemExit("chorus bench: --levels must be concurrency levels from 1 to 256, e.g. 1,2,4,8")
    return levels


def _stack_fields(pairs: list[str]) -> dict:
    fields = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"chorus bench: --stack-arg {pair!r} must be FIELD=VALUE")
        fields[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value
    return fields


def stack_options(pairs: list[str], decoder_precision: str) -> tuple[dict, str]:
    """The Stack fields for the stack the bench starts, and the decoder precision its
    codec workers get: the bench's `--decoder-precision`, unless --stack-arg names one
    (the ceiling and the stack then measure the same decoder)."""
    given = _stack_fields(pairs)
    given.setdefault("decoder_precision", decoder_precision)
    return given, given["decoder_precision"]


def run_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tools.bench import plots, report
    from tools.bench.load import run_level

    levels = _levels(args.levels)
    family = FAMILIES[args.family]
    frames = args.frames or family.default_frames
    if args.gateway and not is_loopback(args.gateway):
        print(f"chorus bench: {args.gateway} is not on this machine; the load sweep runs on loopback only",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    start_buffer_s = args.start_buffer_ms / 1000.0
    ceiling = None
    stack = None
    stack_precision = None
    if args.ceiling:
        from tools.bench import ceiling as ceiling_bench
        backbone, codec_dir = ceiling_bench.family_models(args.models, family.name)
        print(f"measuring the {family.name} ceiling (bare llama_decode beside the streaming decoder, over thread "
              "splits)...", file=sys.stderr)
        ceiling = ceiling_bench.measure(backbone, codec_dir, levels, args.ceiling_seconds, frames=frames,
                                        repeat=args.repeat, decoder_precision=args.decoder_precision,
                                        family=family.name)
    try:
        address = args.gateway
        if not address:
            from tools.supervisor import Stack

            extra, stack_precision = stack_options(args.stack_arg, args.decoder_precision)
            extra.setdefault("neutts", family.name == "neutts-air")
            stack = Stack(models_dir=args.models, gateway_http_port=None, **extra,
                          on_progress=lambda message: print(message, file=sys.stderr))
            stack.start()
            address = stack.gateway_address
        per_level = {c: args.requests or max(8, 4 * c) for c in levels}
        runs: dict[int, list] = {c: [] for c in levels}
        total = sum(per_level.values()) * args.repeat
        with tqdm(total=total, unit="req", desc="chorus bench", file=sys.stderr) as bar:
            first = 0
            for concurrency in levels:
                for repetition in range(args.repeat):
                    bar.set_postfix(concurrent=concurrency, run=f"{repetition + 1}/{args.repeat}")

                    def done(record, bar=bar):
                        bar.update(1)

                    run = asyncio.run(run_level(address, concurrency, per_level[concurrency], frames,
                                                args.max_seconds, args.timeout, first, done, family))
                    first += per_level[concurrency]
                    runs[concurrency].append(run)
    finally:
        if stack is not None:
            stack.stop()
    summaries = [report.LevelRuns(c, tuple(report.figures(run, start_buffer_s) for run in runs[c]))
                 for c in levels]
    for summary in summaries:
        plots.chunk_timeline(runs[summary.concurrency][summary.median_index], start_buffer_s,
                             args.out / f"timeline-{summary.concurrency}.png")
    ceiling_spreads = {b: c.ceiling for b, c in ceiling.best().items()} if ceiling else None
    plots.sweep_summary(summaries, ceiling_spreads, args.out / "sweep.png")
    n_star = ceiling.n_star() if ceiling else None
    result = {
        "family": family.name,
        "frames_per_request": frames,
        "start_buffer_s": start_buffer_s,
        "repeat": args.repeat,
        "decoder_precision": {"requested": args.decoder_precision, "stack": stack_precision,
                              "ceiling": ceiling.decoder_precision if ceiling else None},
        "n_star": n_star,
        "levels": [summary.as_dict() for summary in summaries],
        "ceiling": ceiling.as_json() if ceiling else None,
        # Per level, one entry per run, in run order.
        "requests": {
            str(c): [{"run": i, "started_at": run.started_at, "ended_at": run.ended_at,
                      "records": [asdict(r) for r in run.records]} for i, run in enumerate(runs[c])]
            for c in levels
        },
    }
    (args.out / "bench.json").write_text(json.dumps(result, indent=1))
    print(report.table(summaries, ceiling_spreads))
    if ceiling:
        star = "none" if n_star is None else str(n_star)
        print(f"\nN* = {star}: the largest level whose ceiling (median of {args.repeat} over the best split) "
              f"is at least {ceiling_bench.N_STAR_MARGIN:g}x its streams")
    print(f"\nwrote {args.out / 'bench.json'}, {args.out / 'sweep.png'} and timeline-<level>.png", file=sys.stderr)
    return 0
