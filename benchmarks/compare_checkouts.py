"""Held real time, side by side: the default stack of this checkout against another's.

On a shared machine two runs an hour apart differ as much as the changes being
measured (the ceiling itself moved 20%), so a change to scheduling or admission is
judged here: for each level, a fresh default stack from each checkout in turn, the
order swapped every round, with `chorus bench`'s load runner and listener replay.

    git worktree add /tmp/baseline <rev>
    python benchmarks/compare_checkouts.py --baseline /tmp/baseline --levels 2,8 --rounds 2

The baseline checkout needs its own models/ (a link to this one's is enough).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# Runs inside a checkout, so that its own stack, runner and replay are measured.
ONE_LEVEL = r"""
import asyncio, json, sys, tempfile
from pathlib import Path
from tools.supervisor import Stack
from tools.bench.load import run_level
from tools.bench.report import figures
level, requests, frames = (int(x) for x in sys.argv[1:4])
family = sys.argv[4] if len(sys.argv) > 4 else "orpheus"
neutts = {"neutts": True} if family != "orpheus" else {}
with tempfile.TemporaryDirectory() as work, Stack(models_dir=Path("models/demo"), gateway_http_port=None,
                                                  work_dir=Path(work), **neutts) as stack:
    if neutts:
        from tools.bench.load import FAMILIES
        neutts = {"family": FAMILIES[family]}
    run = asyncio.run(run_level(stack.gateway_address, level, requests, frames, 120, 120, **neutts))
    f = figures(run, 0.15)
    print(json.dumps(dict(held=f.held_real_time, completed=f.completed, stall_s=f.stall_seconds,
                          audio_per_wall=f.audio_per_wall, ttfa_p95_ms=f.ttfa_p95_ms)))
"""


def measure(tree: Path, level: int, requests: int, frames: int, family: str = "orpheus") -> dict:
    done = subprocess.run(
        [sys.executable, "-c", ONE_LEVEL, str(level), str(requests), str(frames), family],
        cwd=tree, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tree)},
    )
    if done.returncode != 0:
        raise SystemExit(f"{tree}: level {level} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, required=True, help="another checkout of Chorus")
    p.add_argument("--levels", default="2,8")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=8, help="requests per level per round")
    p.add_argument("--frames", type=int, default=None, help="frames per request (default: 60 SNAC or 256 NeuCodec)")
    p.add_argument("--family", choices=("orpheus", "neutts-air"), default="orpheus",
                   help="neutts-air: both families' stack, requests in the NeuTTS demo voice (both checkouts "
                        "need the family)")
    args = p.parse_args()
    frames = args.frames or (256 if args.family == "neutts-air" else 60)
    trees = {"baseline": args.baseline.resolve(), "this": HERE}
    levels = [int(x) for x in args.levels.split(",")]
    results: dict[tuple[int, str], list[dict]] = {}
    for round_number in range(args.rounds):
        order = ("baseline", "this") if round_number % 2 == 0 else ("this", "baseline")
        for level in levels:
            for name in order:
                figures = measure(trees[name], level, args.requests, frames, args.family)
                results.setdefault((level, name), []).append(figures)
                print(f"round {round_number + 1} level {level} {name}: {figures}", flush=True)
    print("\n| concurrent | checkout | held real time | stall s | audio s/s per round | TTFA p95 ms per round |")
    print("|---:|---|---:|---:|---|---|")
    for (level, name), runs in sorted(results.items()):
        held = sum(r["held"] for r in runs)
        completed = sum(r["completed"] for r in runs)
        stall = sum(r["stall_s"] for r in runs)
        rates = ", ".join(f"{r['audio_per_wall']:.2f}" for r in runs)
        ttfa = ", ".join(f"{r['ttfa_p95_ms']:.0f}" for r in runs if r["ttfa_p95_ms"] is not None)
        print(f"| {level} | {name} | {held}/{completed} | {stall:.2f} | {rates} | {ttfa} |")


if __name__ == "__main__":
    main()
