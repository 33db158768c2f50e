"""Where one stream's backbone time goes, side by side in one run.

`chorus bench` measures one stream through the whole stack against the ceiling's bare
`llama_decode` loop. This splits the gap on the token server's side, every arm on the
same context and 1 llama thread, medians and ranges over rounds (the three bare arms
interleaved, then the engine's rounds, as the engine takes the context's thread):

- bare: the ceiling's loop, one token a step with its logits (as benchmarks/ceiling.py);
- no output: the same step without logits, so no output layer (what the vocabulary
  projection costs; it is skipped only when no logits are asked for);
- bare + sampling: the bare loop with Chorus's frame-legal sampler on each step;
- engine: one request of the same length through the token engine in process
  (scheduler, sampling, frames, events to an asyncio loop; no gRPC).

Then the sampler's own time a token two ways: inside the bare + sampling loop (right
after each decode) and alone, the same calls on one row in a tight loop (warm caches).

    python benchmarks/one_stream.py [--model models/demo/backbone.gguf] [--tokens 420] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

from chorus.speech import orpheus
from services.token_server.engine import Engine, TOKEN_SECONDS
from services.token_server.request import Finished, GenerationRequest
from services.token_server.llama_backend import LlamaBackbone, TokenBatch
from services.token_server.sampler import SamplingParams, SequenceSampler, gather_legal_logits, sample

TEXT = "Benchmarks speak the same sentence, so that every request costs the same."


def bare(backbone: LlamaBackbone, batch: TokenBatch, prompt: list[int], tokens: int, logits: bool,
         sampled: bool) -> float:
    """Seconds a token: prefill, then `tokens` one-token steps of sequence 0."""
    backbone.clear_sequence(0)
    batch.clear()
    batch.add(prompt, 0, 0, True)
    backbone.decode(batch)
    sampler = SequenceSampler(SamplingParams(seed=1))
    token = orpheus.audio_token_id(0, 0)
    started = time.perf_counter()
    for i in range(tokens):
        batch.clear()
        index = batch.add([token], len(prompt) + i, 0, logits)
        backbone.decode(batch)
        position = np.array([i % orpheus.CODES_PER_FRAME])
        if sampled:
            sampling_started = time.perf_counter()
            code = sample_one(backbone.logits_at(index), sampler, position)
            SAMPLER_SECONDS.append(time.perf_counter() - sampling_started)
            token = orpheus.audio_token_id(code, (i + 1) % orpheus.CODES_PER_FRAME)
    return (time.perf_counter() - started) / tokens


SAMPLER_SECONDS: list[float] = []  # each sampled step of the bare + sampling arm


def sample_one(row: np.ndarray, sampler: SequenceSampler, position: np.ndarray) -> int:
    legal = gather_legal_logits([row], position)
    code = int(sample(legal, [sampler], position, np.zeros(1, dtype=bool))[0])
    sampler.record(int(position[0]), code)
    return code


def sampler_warm(row: np.ndarray, steps: int = 3000) -> float:
    """Seconds a token of the same sampling calls on one row, back to back."""
    sampler = SequenceSampler(SamplingParams(seed=1))
    started = time.perf_counter()
    for i in range(steps):
        sample_one(row, sampler, np.array([i % orpheus.CODES_PER_FRAME]))
    return (time.perf_counter() - started) / steps


def engine_request(engine: Engine, prompt: list[int], tokens: int, seed: int) -> float:
    """Seconds a token of one request, submit to Finished (prefill included)."""

    async def run() -> float:
        started = time.perf_counter()
        handle = engine.submit(GenerationRequest(f"one-{seed}", prompt, SamplingParams(seed=seed), token_budget=tokens,
                                                 ignore_end_of_speech=True, needs_codec=False))
        async for event in handle.events():
            if isinstance(event, Finished):
                return (time.perf_counter() - started) / tokens
        raise RuntimeError("the request failed")

    return asyncio.run(run())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("models/demo/backbone.gguf"))
    p.add_argument("--tokens", type=int, default=420, help="tokens a run (420: 60 frames, 5.12 s of audio)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    ctx = 2048
    backbone = LlamaBackbone(args.model, n_ctx=ctx, n_batch=512, n_seq_max=1, threads=1)
    prompt = orpheus.wrap_prompt(backbone.tokenize(orpheus.prompt_text(TEXT, orpheus.DEFAULT_VOICE)))
    batch = TokenBatch(512, 1)
    arms = {
        "bare": lambda: bare(backbone, batch, prompt, args.tokens, logits=True, sampled=False),
        "no output": lambda: bare(backbone, batch, prompt, args.tokens, logits=False, sampled=False),
        "bare + sampling": lambda: bare(backbone, batch, prompt, args.tokens, logits=True, sampled=True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in [*arms, "engine"]}
    for _ in range(args.rounds):
        for name, arm in arms.items():
            seconds[name].append(arm())
    row = backbone.logits_at(batch.n_tokens - 1).copy()  # the last step's logits, kept past the next decode
    batch.free()
    engine = Engine(backbone, slots=1, n_batch=512, queue_size=1, ctx_per_slot=ctx, probe_interval_s=None)
    engine.start()
    try:
        for round_ in range(args.rounds):
            seconds["engine"].append(engine_request(engine, prompt, args.tokens, seed=round_))
    finally:
        engine.stop()
    base = float(np.median(seconds["bare"]))
    rows = {}
    print("| arm | ms a token | audio s/s | of bare |\n|---|---:|---:|---:|")
    for name, values in seconds.items():
        med = float(np.median(values))
        speed = [TOKEN_SECONDS / v for v in values]
        rows[name] = dict(ms_per_token=med * 1000, audio_per_s=TOKEN_SECONDS / med,
                          audio_per_s_range=[min(speed), max(speed)], of_bare=base / med)
        print(f"| {name} | {med * 1000:.3f} | {TOKEN_SECONDS / med:.2f} [{min(speed):.2f}-{max(speed):.2f}] "
              f"| {base / med:.0%} |")
    in_loop, warm = float(np.median(SAMPLER_SECONDS)), sampler_warm(row)
    print(f"sampler a token: {in_loop * 1000:.3f} ms in the loop (median step), {warm * 1000:.3f} ms alone, warm")
    rows["sampler"] = dict(in_loop_ms=in_loop * 1000, warm_ms=warm * 1000)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
