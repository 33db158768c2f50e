"""The token server engine's tokens/s on each llama.cpp build, side by side in one run.

Each cached wheel (tools/llama_wheel: the native build for this CPU, AMX off, and the
portable AVX2 build) is unpacked into its own folder and put first on a child
process's path, so every arm runs the same engine code on its own libggml. The
arms alternate over --rounds; each child runs the engine (bench_token_server's
bench_engine) at 1 and 8 concurrent requests and reports aggregate tokens/s. The
figure per arm is the median over rounds; the ratio is what the native build gains
over the portable one on this CPU, which is also what llama.cpp's runtime dispatch
would gain over the portable build on a CPU like this one.

    python benchmarks/llama_builds.py [--rounds 5] [--threads 1] [--frames 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.llama_wheel import cache as wheel_cache  # noqa: E402
from tools.llama_wheel.flavours import by_name  # noqa: E402

CHILD = r"""
import json, sys
sys.path.insert(0, "benchmarks")
import llama_cpp
from bench_token_server import CTX_PER_SLOT, bench_engine
from chorus.realtime.capacity import RealTimeCapacity
from chorus.speech import orpheus
from services.token_server.engine import TOKEN_SECONDS, Engine
from services.token_server.llama_backend import LlamaBackbone
model, threads, frames = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
backbone = LlamaBackbone(__import__("pathlib").Path(model), n_ctx=8 * CTX_PER_SLOT, n_batch=512, n_seq_max=8,
                         threads=threads)
engine = Engine(backbone, slots=8, n_batch=512, queue_size=0, ctx_per_slot=CTX_PER_SLOT,
                capacity=RealTimeCapacity(TOKEN_SECONDS, 8, enforce=False))
engine.start()
out = {"library": llama_cpp.__file__}
for level in (1, 8):
    out[f"tok_s@{level}"] = bench_engine(engine, level, frames * orpheus.CODES_PER_FRAME)["aggregate_tok_s"]
engine.stop()
print(json.dumps(out))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models/demo/backbone.gguf")
    p.add_argument("--cache", type=Path,
                   default=Path(os.environ.get("CHORUS_WHEEL_CACHE", Path.home() / ".cache/chorus/wheels")))
    p.add_argument("--flavours", default="native,portable")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--frames", type=int, default=32, help="frames per request")
    args = p.parse_args()
    store = wheel_cache.WheelCache(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        arms = {}
        for name in args.flavours.split(","):
            entry = store.entry(by_name(name).key())
            if entry.wheel is None:
                raise SystemExit(f"no cached {name} wheel for this CPU in {args.cache}: build it with "
                                 f"`python -m tools.llama_wheel setup --flavour {name}`")
            folder = Path(tmp) / name
            with zipfile.ZipFile(entry.wheel) as wheel:
                wheel.extractall(folder)
            arms[name] = (folder, entry.record or {})
        results: dict[str, list[dict]] = {name: [] for name in arms}
        for _ in range(args.rounds):
            for name, (folder, _) in arms.items():
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)])}
                done = subprocess.run([sys.executable, "-c", CHILD, str(args.model), str(args.threads),
                                       str(args.frames)], cwd=ROOT, env=env, capture_output=True, text=True,
                                      check=True)
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                assert figures["library"].startswith(str(folder)), figures["library"]
                results[name].append(figures)
    print(f"model {args.model}, {args.threads} llama thread(s), {args.frames} frames a request, "
          f"median of {args.rounds} alternating rounds\n")
    print("| build | instruction sets | 1 request tok/s | 8 requests tok/s |")
    print("|---|---|---:|---:|")
    medians = {}
    for name, runs in results.items():
        medians[name] = {k: statistics.median(r[k] for r in runs) for k in ("tok_s@1", "tok_s@8")}
        sets = [s for s in arms[name][1].get("instruction_sets", []) if s.startswith(("AVX", "FMA", "F16C", "AMX"))]
        print(f"| {name} | {' '.join(sets)} | {medians[name]['tok_s@1']:.0f} | {medians[name]['tok_s@8']:.0f} |")
    names = list(medians)
    if len(names) == 2:
        a, b = names
        print(f"\n{a}/{b}: {medians[a]['tok_s@1'] / medians[b]['tok_s@1']:.2f}x at 1 request, "
              f"{medians[a]['tok_s@8'] / medians[b]['tok_s@8']:.2f}x at 8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
