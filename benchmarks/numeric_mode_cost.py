"""What the codec's numeric mode costs in decoder speed, side by side in one run.

The mode is fixed when MKL starts, so each arm runs in its own child process, the
arms interleaved over --repeats rounds; each child reports process CPU seconds per
second of audio for the streaming decoder at 1, 4 and 8 streams a forward (1-frame
steps, noise on and seeded, as served) on --threads torch threads. Arms:

- vendor: the codec worker's default (MKL's default kernels on AMD, AVX2+STRICT on
  Intel);
- compatible: --numeric-mode compatible (MKL COMPATIBLE, GEMMs on one MKL thread:
  the same bits on every x86 CPU);
- default: MKL's default kernels, whatever the vendor (the decoder before numeric
  modes; on Intel its bits changed with chunking).

--other-vendor also runs both arms with MKL taking the other vendor's kernels (a
preloaded stub of MKL's vendor check, as tests/codec_worker/test_codec_numeric_mode.py does),
which prices the mode for the other kind of CPU on this one.

    python benchmarks/numeric_mode_cost.py [--snac-dir models/demo/snac] [--repeats 5] [--threads 1] [--other-vendor]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, os, sys, time
import numpy as np
from services.codec_worker import numeric_mode
if sys.argv[2] == "default":
    os.environ.pop("MKL_CBWR", None)
    numeric_mode.ensure = lambda mode: numeric_mode.current()
else:
    numeric_mode.select(sys.argv[2])
import torch
from chorus.speech.orpheus import SAMPLE_RATE, SAMPLES_PER_FRAME
from services.codec_worker.model import load_snac
from services.codec_worker.streaming_decoder import StreamingSnacDecoder
torch.set_num_threads(int(sys.argv[3]))
frames_per_stream = int(sys.argv[4])
mode = "vendor" if sys.argv[2] == "default" else sys.argv[2]
decoder = StreamingSnacDecoder(load_snac(sys.argv[1], device="cpu", mode=mode).model)
decoder.warm_up()
rng = np.random.default_rng(0)
out = {"mode": numeric_mode.current()}
for batch in (1, 4, 8):
    codes = rng.integers(0, 4096, (batch, frames_per_stream, 7))
    states = [decoder.new_stream(seed=k + 1) for k in range(batch)]
    started = time.process_time()
    for i in range(frames_per_stream):
        decoder.decode([(states[k], codes[k, i:i + 1]) for k in range(batch)])
    for state in states:
        decoder.flush(state)
    audio_s = batch * frames_per_stream * SAMPLES_PER_FRAME / SAMPLE_RATE
    out[f"cpu_s_per_audio_s@{batch}"] = (time.process_time() - started) / audio_s
print(json.dumps(out))
"""

def run_arm(snac_dir: Path, mode: str, threads: int, frames: int, preload: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    if preload:
        env["LD_PRELOAD"] = preload
    done = subprocess.run([sys.executable, "-c", CHILD, str(snac_dir), mode, str(threads), str(frames)],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--snac-dir", type=Path, default=None, help="SNAC directory; default: the demo one")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--frames", type=int, default=24, help="frames per stream")
    p.add_argument("--other-vendor", action="store_true")
    args = p.parse_args()
    snac_dir = args.snac_dir
    if snac_dir is None:
        from tools.demo_models.build import build_demo_models

        snac_dir = build_demo_models(ROOT / "models" / "demo").snac_dir
    with tempfile.TemporaryDirectory() as tmp:
        vendors = [("this CPU's kernels", None)]
        if args.other_vendor:
            from tools.llama_wheel import preload

            stub = preload.build("other_vendor", preload.other_mkl_vendor(), Path(tmp))["LD_PRELOAD"]
            vendors.append(("other vendor's kernels", stub))
        for label, preload in vendors:
            runs: dict[str, list[dict]] = {"vendor": [], "compatible": [], "default": []}
            for _ in range(args.repeats):
                for mode in runs:
                    runs[mode].append(run_arm(snac_dir, mode, args.threads, args.frames, preload))
            reported = ", ".join(f"{mode}: {r[0]['mode']}" for mode, r in runs.items())
            print(f"{label}, {args.threads} torch thread(s), median of {args.repeats} interleaved runs, "
                  f"CPU s per audio s ({reported})")
            for key in [k for k in runs["vendor"][0] if k.startswith("cpu_s")]:
                m = {mode: statistics.median(r[key] for r in rs) for mode, rs in runs.items()}
                print(f"  {key.split('@')[1]} streams: vendor {m['vendor']:.3f}  compatible {m['compatible']:.3f}  "
                      f"default {m['default']:.3f}  vendor/default {m['vendor'] / m['default']:.2f}x  "
                      f"compatible/default {m['compatible'] / m['default']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
