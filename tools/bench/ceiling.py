"""The machine's ceiling for streams of speech: bare `llama_decode` beside the streaming
SNAC decoder, both flat out, over thread splits.

What a serving stack can deliver is bounded by the two pieces of work every second of
audio needs: ~82 backbone tokens and 11.7 frames of decoding. Here they run with
nothing around them, in two processes started at the same instant and sharing the
machine as the token server and the codec worker do:

- the backbone process runs bare `llama_decode` at batch B (one token per sequence per
  step, logits requested as the engine does, nothing sampled), cycling each sequence
  through a request's life (prefill the prompt, generate `--frames` frames, clear) so
  that positions and prefill cost are those of the real workload;
- the decoder process runs Chorus's own `StreamingSnacDecoder` on B streams batched in
  one forward, feeding each stream `--frames-per-step` frames a step (1: latency mode,
  as when the codec keeps up; more: the backlog mode of a codec that fell behind), each
  stream flushed and restarted after `--frames` frames.

Each side's rate converts to seconds of audio per wall second (the backbone's tokens /
82.03, the decoder's frames x 85.33 ms). The pair can deliver no more than the slower
of the two, so ceiling(B, split) = min(backbone, decoder), and the ceiling at B is the
best split. Thread splits cover every (llama threads, torch threads) pair up to the
CPUs this process may use (`chorus.cpu_budget`).

    python benchmarks/ceiling.py [--batches 1,2,4,8] [--seconds 4] [--json ceiling.json]

`chorus bench --ceiling` runs this in the same invocation as its load sweep, so that the
sweep's figures and their denominator come from one run (the services are not yet
started while it measures).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from chorus import orpheus
from chorus.cpu_budget import cpu_budget

TEXT = "Benchmarks speak the same sentence, so that every request costs the same."
CTX_PER_SLOT = 1024


@dataclass(frozen=True)
class Run:
    batch: int
    threads: int
    frames_per_step: int
    start_at: float  # time.time() at which both sides start
    seconds: float


def _backbone_side(conn, model: str, max_batch: int, frames: int) -> None:
    import llama_cpp as llama

    from services.token_server.llama_backend import LlamaBackbone, TokenBatch

    backbone = LlamaBackbone(
        Path(model), n_ctx=max_batch * CTX_PER_SLOT, n_batch=512, n_seq_max=max_batch, threads=1
    )
    prompt = orpheus.wrap_prompt(backbone.tokenize(orpheus.prompt_text(TEXT, orpheus.DEFAULT_VOICE)))
    tokens_per_request = frames * orpheus.CODES_PER_FRAME
    batch = TokenBatch(512, max_batch)
    conn.send("ready")
    while (run := conn.recv()) is not None:
        llama.llama_set_n_threads(backbone.ctx, run.threads, run.threads)
        generated = [0] * run.batch
        for seq in range(run.batch):
            backbone.clear_sequence(seq)
        time.sleep(max(0.0, run.start_at - time.time()))
        started = time.perf_counter()
        tokens = 0
        while time.perf_counter() - started < run.seconds:
            # A sequence at the end of its request starts the next one: clear, prefill.
            for seq in range(run.batch):
                if generated[seq] in (0, tokens_per_request):
                    backbone.clear_sequence(seq)
                    batch.clear()
                    batch.add(prompt, 0, seq, True)
                    backbone.decode(batch)
                    generated[seq] = 0
            batch.clear()
            for seq in range(run.batch):
                position = generated[seq] % orpheus.CODES_PER_FRAME
                token = orpheus.AUDIO_TOKEN_BASE + position * orpheus.CODEBOOK_SIZE + seq
                batch.add([token], len(prompt) + generated[seq], seq, True)
                generated[seq] += 1
            backbone.decode(batch)
            tokens += run.batch
        elapsed = time.perf_counter() - started
        conn.send(tokens / elapsed / orpheus.TOKENS_PER_AUDIO_SECOND)
    batch.free()
    backbone.close()


def _decoder_side(conn, snac_dir: str, frames: int) -> None:
    import numpy as np
    import torch

    from services.codec_worker.model import load_snac
    from services.codec_worker.streaming_decoder import StreamingSnacDecoder

    decoder = StreamingSnacDecoder(load_snac(snac_dir, "cpu").model)
    decoder.warm_up()
    codes = np.random.default_rng(0).integers(0, orpheus.CODEBOOK_SIZE, (frames, orpheus.CODES_PER_FRAME))
    conn.send("ready")
    while (run := conn.recv()) is not None:
        torch.set_num_threads(run.threads)
        states = [decoder.new_stream() for _ in range(run.batch)]
        fed = 0
        time.sleep(max(0.0, run.start_at - time.time()))
        started = time.perf_counter()
        decoded = 0
        while time.perf_counter() - started < run.seconds:
            if fed + run.frames_per_step > frames:  # every stream's request ends together
                for state in states:
                    decoder.flush(state)
                states = [decoder.new_stream() for _ in range(run.batch)]
                fed = 0
            chunk = codes[fed : fed + run.frames_per_step]
            decoder.decode([(state, chunk) for state in states], max_batch=run.batch)
            fed += run.frames_per_step
            decoded += run.batch * run.frames_per_step
        elapsed = time.perf_counter() - started
        conn.send(decoded * orpheus.FRAME_SECONDS / elapsed)


@dataclass(frozen=True)
class Split:
    batch: int
    llama_threads: int
    torch_threads: int
    frames_per_step: int
    backbone_audio_s: float
    decoder_audio_s: float

    @property
    def ceiling(self) -> float:
        return min(self.backbone_audio_s, self.decoder_audio_s)


def measure(
    model: Path,
    snac_dir: Path,
    batches: list[int],
    seconds: float = 4.0,
    frames: int = 60,
    frames_per_step: tuple[int, ...] = (1, 2),
    cpus: int | None = None,
    on_progress=lambda message: None,
) -> list[Split]:
    """Every (batch, llama threads, torch threads, frames per step) combination, both
    sides started together."""
    cpus = cpus or max(1, int(cpu_budget().cpus))
    ctx = mp.get_context("spawn")
    backbone_conn, backbone_child = ctx.Pipe()
    decoder_conn, decoder_child = ctx.Pipe()
    sides = [
        ctx.Process(target=_backbone_side, args=(backbone_child, str(model), max(batches), frames), daemon=True),
        ctx.Process(target=_decoder_side, args=(decoder_child, str(snac_dir), frames), daemon=True),
    ]
    for side in sides:
        side.start()
    try:
        for conn in (backbone_conn, decoder_conn):
            if conn.recv() != "ready":
                raise RuntimeError("a ceiling process failed to start")
        results = []
        threads = range(1, cpus + 1)
        for batch, llama_threads, torch_threads, fps in itertools.product(batches, threads, threads, frames_per_step):
            start_at = time.time() + 0.2
            backbone_conn.send(Run(batch, llama_threads, 1, start_at, seconds))
            decoder_conn.send(Run(batch, torch_threads, fps, start_at, seconds))
            split = Split(batch, llama_threads, torch_threads, fps, backbone_conn.recv(), decoder_conn.recv())
            on_progress(split)
            results.append(split)
        return results
    finally:
        for conn in (backbone_conn, decoder_conn):
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for side in sides:
            side.join(10)
            if side.is_alive():
                side.kill()


def best_by_batch(splits: list[Split]) -> dict[int, Split]:
    best: dict[int, Split] = {}
    for split in splits:
        if split.batch not in best or split.ceiling > best[split.batch].ceiling:
            best[split.batch] = split
    return best


def as_json(splits: list[Split]) -> dict:
    return {
        "splits": [{**asdict(s), "ceiling": s.ceiling} for s in splits],
        "best": {str(b): {**asdict(s), "ceiling": s.ceiling} for b, s in best_by_batch(splits).items()},
    }


def table(splits: list[Split]) -> str:
    lines = [
        "| batch | llama threads | torch threads | frames/step | backbone audio s/s | decoder audio s/s | ceiling |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    best = best_by_batch(splits)
    for s in splits:
        mark = " **best**" if best[s.batch] is s else ""
        lines.append(
            f"| {s.batch} | {s.llama_threads} | {s.torch_threads} | {s.frames_per_step} | "
            f"{s.backbone_audio_s:.2f} | {s.decoder_audio_s:.2f} | {s.ceiling:.2f}{mark} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("models/demo"), help="demo models folder (built if missing)")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per combination")
    parser.add_argument("--frames", type=int, default=60, help="frames per request")
    parser.add_argument("--frames-per-step", default="1,2", help="decoder frames per stream per step to try")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from tools.supervisor import locate_models

    models = locate_models(args.models)
    splits = measure(
        models.gguf, models.snac_dir, [int(b) for b in args.batches.split(",")], args.seconds, args.frames,
        tuple(int(f) for f in args.frames_per_step.split(",")),
        on_progress=lambda s: print(f"batch {s.batch} llama {s.llama_threads} torch {s.torch_threads} "
                                    f"fps {s.frames_per_step}: {s.backbone_audio_s:.2f} / {s.decoder_audio_s:.2f}",
                                    flush=True),
    )
    print(table(splits))
    if args.json:
        args.json.write_text(json.dumps(as_json(splits), indent=2))


if __name__ == "__main__":
    main()
