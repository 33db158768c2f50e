"""The machine's ceiling for streams of speech: bare `llama_decode` beside the streaming
SNAC decoder, both flat out, over thread splits.

What a serving stack can deliver is bounded by the two pieces of work every second of
audio needs: ~82 backbone tokens and 11.7 frames of decoding. Here they run with
nothing around them, in two processes started at the same instant and sharing the
machine as the token server and the codec worker do (each with idle OpenMP threads
sleeping, as the services' entry points set):

- the backbone process runs bare `llama_decode` at batch B (one token per sequence per
  step, logits requested as the engine does, nothing sampled), cycling each sequence
  through a request's life (prefill the prompt, generate `--frames` frames, clear) so
  that positions and prefill cost are those of the real workload;
- the decoder process runs Chorus's own `StreamingSnacDecoder` on B streams batched in
  one forward, in the decoder precision a codec worker would run (`--decoder-precision`,
  resolved as the codec worker resolves it), feeding each stream `--frames-per-step`
  frames a step (1: latency mode, as when the codec keeps up; more: the backlog mode of
  a codec that fell behind), each stream flushed and restarted after `--frames` frames.

Each side's rate converts to seconds of audio per wall second (the backbone's tokens /
82.03, the decoder's frames x 85.33 ms). The pair can deliver no more than the slower
of the two, so a trial's ceiling is min(backbone, decoder). Every combination (batch,
llama threads, torch threads, frames per step) runs `--repeat` times; its ceiling is
the median of its trials' ceilings, and the ceiling at B is the combination with the
best median. Each figure is reported as median [min-max] over the repeats.

Thread splits cover the (llama threads, torch threads) pairs that fit the CPUs this
process may use (`chorus.realtime.cpu_budget`), or `--cpus N` of them (both processes pinned to
N CPUs, as `taskset` would, to measure a smaller deployment's split on a larger
machine). Splits whose two pools together take more threads than there are CPUs are
skipped unless `--oversubscribed` (on one CPU 1+1 stays: no pool has fewer than one
thread): `chorus serve` never picks one (`split_for_stack`), and on 2 cores they
collapse (2+2 at batch 3 measured 2.62 / 1.46 audio s/s against 1+1's 9.82 / 5.78), so
they only cost time and never win.

`--family neutts-air` measures the NeuTTS-Air pair the same way: its backbone (a
prompt holding a 2 s reference and its transcript, one code token a frame at 50 frames
a second) beside the streaming NeuCodec decoder, which decodes each stream in its own
forward (no cross-stream batch), so its side's figure at B is B streams decoded one
after another.

N* is the largest measured batch whose ceiling is at least 1.15x its streams: the
most streams this machine could hold real time with the 15% margin a stack needs for
everything the bare loops leave out (sampling, relays, the gateway, scheduling).

    python benchmarks/ceiling.py [--batches 1,2,4,8] [--seconds 4] [--repeat 3] [--json ceiling.json]

`chorus bench --ceiling` runs this in the same invocation as its load sweep, so that the
sweep's figures and their denominator come from one run (the services are not yet
started while it measures).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from chorus.realtime.cpu_budget import cpu_budget
from chorus.speech import orpheus
from chorus.speech.family import ORPHEUS
from tools.bench.stats import Spread

TEXT = "Benchmarks speak the same sentence, so that every request costs the same."
# A NeuTTS-Air slot also holds its voice's reference: 2 s of codes and their words, as
# the demo voice's (tools/demo_models/neutts_demo.py).
NEUTTS_REFERENCE_FRAMES = 100
NEUTTS_TRANSCRIPT = "This is the demo voice of Chorus, made of random codes."
CTX_PER_SLOT = 1024
# A stack needs this much over its streams' real-time rate for what the bare loops
# leave out; the same 15% the capacity issue's target uses.
N_STAR_MARGIN = 1.15
# The codec worker's names (services/codec_worker/precision.py CHOICES), spelled out so
# that parsing a command line does not import the codec worker's package.
DECODER_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Run:
    batch: int
    threads: int
    frames_per_step: int
    start_at: float  # time.time() at which both sides start
    seconds: float


def _start_side(conn, start) -> object:
    """Runs a side's setup, telling the parent why it failed instead of leaving it a
    closed pipe to guess from."""
    from chorus.realtime.cpu_budget import sleep_idle_threads

    sleep_idle_threads()  # before llama.cpp or torch loads OpenMP, as the services' entry points do
    try:
        return start()
    except BaseException as err:
        conn.send(("error", f"{type(err).__name__}: {err}"))
        raise


def _backbone_side(conn, model: str, max_batch: int, frames: int, family_name: str = ORPHEUS) -> None:
    def start():
        from services.token_server.llama_backend import LlamaBackbone

        return LlamaBackbone(
            Path(model), n_ctx=max_batch * CTX_PER_SLOT, n_batch=512, n_seq_max=max_batch, threads=1
        )

    backbone = _start_side(conn, start)
    import llama_cpp as llama

    from services.token_server.llama_backend import TokenBatch

    prompt, family = _prompt_and_family(backbone, family_name)
    tokens_per_request = frames * family.codes_per_frame
    batch = TokenBatch(512, max_batch)
    conn.send(("ready", None))
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
                position = generated[seq] % family.codes_per_frame
                token = family.code_token_id(seq % family.codebook_size, position)
                batch.add([token], len(prompt) + generated[seq], seq, True)
                generated[seq] += 1
            backbone.decode(batch)
            tokens += run.batch
        elapsed = time.perf_counter() - started
        conn.send(tokens / elapsed / family.tokens_per_audio_second)
    batch.free()
    backbone.close()


def _prompt_and_family(backbone, family_name: str):
    """The prompt a benchmark request's slot holds, and the family whose code tokens
    it then generates. NeuTTS-Air's prompt carries a 2 s reference (as the demo
    voice's) and its transcript, as phonemes when the backbone reads them."""
    if family_name == ORPHEUS:
        return orpheus.wrap_prompt(backbone.tokenize(orpheus.prompt_text(TEXT, orpheus.DEFAULT_VOICE))), orpheus.FAMILY
    import numpy as np

    from chorus.speech import neutts

    vocabulary = neutts.resolve(backbone.token_text, backbone.n_vocab, backbone.metadata(neutts.INPUT_FORMAT_KEY))
    phonemize = lambda text: text  # noqa: E731
    if vocabulary.input_format == neutts.PHONEMES:
        from chorus.speech.phonemes import Phonemizer

        phonemize = Phonemizer()
    reference = np.random.default_rng(0).integers(0, neutts.CODEBOOK_SIZE, NEUTTS_REFERENCE_FRAMES)
    prompt = vocabulary.prompt(lambda text: backbone.tokenize(text, add_bos=False), phonemize(NEUTTS_TRANSCRIPT),
                               reference.tolist(), phonemize(TEXT))
    return prompt, vocabulary.family


def streaming_decoder(snac_dir: str, precision_name: str):
    """The streaming decoder a codec worker given `--decoder-precision precision_name`
    would run, and the precision that name resolved to on this CPU."""
    from services.codec_worker import precision
    from services.codec_worker.model import load_snac
    from services.codec_worker.streaming_decoder import StreamingSnacDecoder

    model = load_snac(snac_dir, "cpu").model
    mode = precision.resolve(precision_name)
    return StreamingSnacDecoder(model, precision=mode), mode


def neucodec_decoder(neucodec_dir: str):
    """The streaming decoder a NeuCodec worker runs (fp32, one stream a forward)."""
    from services.codec_worker.neucodec_model import load_neucodec
    from services.codec_worker.neucodec_streaming import NeuCodecStreams

    return NeuCodecStreams(load_neucodec(neucodec_dir)), "fp32"


def _decoder_side(conn, model_dir: str, frames: int, precision_name: str, family_name: str = ORPHEUS) -> None:
    def start():
        if family_name == ORPHEUS:
            decoder, mode = streaming_decoder(model_dir, precision_name)
        else:
            decoder, mode = neucodec_decoder(model_dir)
        decoder.warm_up()
        return decoder, mode

    decoder, mode = _start_side(conn, start)
    import numpy as np
    import torch

    # Both decoders state their codec's facts, as the decode engine reads them.
    codes = np.random.default_rng(0).integers(0, decoder.codebook_size, (frames, decoder.codes_per_frame))
    conn.send(("ready", mode))
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
        conn.send(decoded * decoder.frame_seconds / elapsed)


@dataclass(frozen=True)
class Split:
    """One trial of one combination."""

    batch: int
    llama_threads: int
    torch_threads: int
    frames_per_step: int
    backbone_audio_s: float
    decoder_audio_s: float
    trial: int = 0

    @property
    def ceiling(self) -> float:
        return min(self.backbone_audio_s, self.decoder_audio_s)

    @property
    def key(self) -> tuple[int, int, int, int]:
        return (self.batch, self.llama_threads, self.torch_threads, self.frames_per_step)


@dataclass(frozen=True)
class Combination:
    """One (batch, split, frames per step) over its repeats. `ceiling` is the median of
    each trial's min(backbone, decoder), not the min of the two medians: the two sides
    of one trial shared the machine at the same moment, and that pairing is the point."""

    batch: int
    llama_threads: int
    torch_threads: int
    frames_per_step: int
    trials: int
    backbone_audio_s: Spread
    decoder_audio_s: Spread
    ceiling: Spread

    @classmethod
    def of(cls, trials: list[Split]) -> Combination:
        first = trials[0]
        return cls(first.batch, first.llama_threads, first.torch_threads, first.frames_per_step, len(trials),
                   Spread.of(t.backbone_audio_s for t in trials), Spread.of(t.decoder_audio_s for t in trials),
                   Spread.of(t.ceiling for t in trials))

    def as_dict(self) -> dict:
        return asdict(self)


def combinations(splits: list[Split]) -> list[Combination]:
    """The trials grouped by combination, in the order the combinations were first measured."""
    grouped: dict[tuple, list[Split]] = {}
    for split in splits:
        grouped.setdefault(split.key, []).append(split)
    return [Combination.of(trials) for trials in grouped.values()]


def best_by_batch(splits: list[Split]) -> dict[int, Combination]:
    """Per batch, the combination with the highest median ceiling."""
    best: dict[int, Combination] = {}
    for combo in combinations(splits):
        if combo.batch not in best or combo.ceiling.median > best[combo.batch].ceiling.median:
            best[combo.batch] = combo
    return best


def n_star(ceilings: Mapping[int, float], margin: float = N_STAR_MARGIN) -> int | None:
    """The largest measured level C whose ceiling is at least `margin` x C; None when no
    level has that much room. Not "every level up to C": a level that dips under on a
    noisy run does not hide a larger one that clears it."""
    held = [level for level, ceiling in ceilings.items() if ceiling >= margin * level]
    return max(held) if held else None


def thread_splits(cpus: int, oversubscribed: bool = False) -> list[tuple[int, int]]:
    """(llama threads, torch threads) pairs to measure on `cpus` CPUs. Without
    `oversubscribed`, only pairs whose threads fit the CPUs, as `split_for_stack` picks;
    on one CPU 1+1 stays, since neither pool can have fewer than one thread."""
    pairs = list(itertools.product(range(1, cpus + 1), repeat=2))
    if oversubscribed:
        return pairs
    return [(llama, torch) for llama, torch in pairs if llama + torch <= max(cpus, 2)]


def pinned_cpus(cpus: int) -> set[int]:
    """The first `cpus` CPUs of this process's affinity mask."""
    available = sorted(os.sched_getaffinity(0))
    if not 1 <= cpus <= len(available):
        raise ValueError(f"--cpus {cpus}: this process may use {len(available)} CPUs")
    return set(available[:cpus])


@dataclass
class Ceiling:
    """A measurement: every trial, and how it was taken."""

    splits: list[Split]
    cpus: int
    pinned: bool  # both sides pinned to `cpus` CPUs (--cpus)
    repeat: int
    oversubscribed: bool
    decoder_precision: str  # what the requested name resolved to on this CPU

    def best(self) -> dict[int, Combination]:
        return best_by_batch(self.splits)

    def medians(self) -> dict[int, float]:
        """Per batch, the best combination's median ceiling: the denominator of `chorus bench`."""
        return {batch: combo.ceiling.median for batch, combo in self.best().items()}

    def n_star(self) -> int | None:
        return n_star(self.medians())

    def as_json(self) -> dict:
        return {
            "cpus": self.cpus,
            "pinned": self.pinned,
            "repeat": self.repeat,
            "oversubscribed": self.oversubscribed,
            "decoder_precision": self.decoder_precision,
            "n_star": self.n_star(),
            "n_star_margin": N_STAR_MARGIN,
            "best": {str(b): c.as_dict() for b, c in sorted(self.best().items())},
            "combinations": [c.as_dict() for c in combinations(self.splits)],
            "splits": [{**asdict(s), "ceiling": s.ceiling} for s in self.splits],
        }

    def table(self) -> str:
        """Every combination, median [min-max] over its trials, the best per batch marked;
        then the best per batch and N*."""
        lines = [
            "| batch | llama threads | torch threads | frames/step | backbone audio s/s | decoder audio s/s "
            "| ceiling |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        best = self.best()
        for c in combinations(self.splits):
            mark = " **best**" if best[c.batch] == c else ""
            lines.append(
                f"| {c.batch} | {c.llama_threads} | {c.torch_threads} | {c.frames_per_step} | "
                f"{c.backbone_audio_s.text()} | {c.decoder_audio_s.text()} | {c.ceiling.text()}{mark} |"
            )
        lines += ["", "| batch | best split | backbone audio s/s | decoder audio s/s | ceiling | "
                  f"ceiling >= {N_STAR_MARGIN:g} x batch |", "|---:|---|---:|---:|---:|---|"]
        for batch, c in sorted(best.items()):
            lines.append(
                f"| {batch} | {c.llama_threads}+{c.torch_threads}, frames/step {c.frames_per_step} | "
                f"{c.backbone_audio_s.text()} | {c.decoder_audio_s.text()} | {c.ceiling.text()} | "
                f"{'yes' if c.ceiling.median >= N_STAR_MARGIN * batch else 'no'} |"
            )
        star = self.n_star()
        lines += ["", f"N* = {star if star is not None else 'none'} (largest batch whose median ceiling is at least "
                      f"{N_STAR_MARGIN:g} x its streams; {self.repeat} trial(s) each, {self.cpus} CPUs"
                      f"{' pinned' if self.pinned else ''}, decoder {self.decoder_precision})"]
        return "\n".join(lines)


def measure(
    model: Path,
    snac_dir: Path,
    batches: list[int],
    seconds: float = 4.0,
    frames: int = 60,
    frames_per_step: tuple[int, ...] = (1, 2),
    cpus: int | None = None,
    repeat: int = 3,
    oversubscribed: bool = False,
    decoder_precision: str = "auto",
    on_progress=lambda split: None,
    family: str = ORPHEUS,
) -> Ceiling:
    """Every (batch, llama threads, torch threads, frames per step) combination, both
    sides started together, `repeat` times.

    The repeats are rounds over all combinations rather than back-to-back trials of
    one, so that a neighbour's burst on a shared machine lands on several
    combinations once instead of on one combination every time. `cpus` pins both
    sides to that many CPUs of this process's; None measures on this process's CPU
    budget, unpinned. `family` ("orpheus", "neutts-air") picks the prompt, the code
    tokens and the decoder: `model` is that family's backbone and `snac_dir` its codec's
    folder (NeuCodec's for NeuTTS-Air)."""
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    pinned = cpus is not None
    pin_to = pinned_cpus(cpus) if pinned else None
    cpus = cpus or max(1, int(cpu_budget().cpus))
    previous_affinity = os.sched_getaffinity(0)
    ctx = mp.get_context("spawn")
    backbone_conn, backbone_child = ctx.Pipe()
    decoder_conn, decoder_child = ctx.Pipe()
    sides = [
        ctx.Process(target=_backbone_side, args=(backbone_child, str(model), max(batches), frames, family),
                    daemon=True),
        ctx.Process(target=_decoder_side, args=(decoder_child, str(snac_dir), frames, decoder_precision, family),
                    daemon=True),
    ]
    try:
        if pin_to is not None:
            os.sched_setaffinity(0, pin_to)  # the sides inherit it from birth, as under taskset
        for side in sides:
            side.start()
        os.sched_setaffinity(0, previous_affinity)  # only the sides stay pinned
        ready = []
        for name, conn in (("backbone", backbone_conn), ("decoder", decoder_conn)):
            try:
                status, detail = conn.recv()
            except EOFError:
                status, detail = "error", "exited before it was ready"
            if status != "ready":
                raise RuntimeError(f"the ceiling's {name} process failed to start: {detail}")
            ready.append(detail)
        mode = ready[1]
        results = []
        combos = list(itertools.product(batches, thread_splits(cpus, oversubscribed), frames_per_step))
        for trial in range(repeat):
            for batch, (llama_threads, torch_threads), fps in combos:
                start_at = time.time() + 0.2
                backbone_conn.send(Run(batch, llama_threads, 1, start_at, seconds))
                decoder_conn.send(Run(batch, torch_threads, fps, start_at, seconds))
                split = Split(batch, llama_threads, torch_threads, fps, backbone_conn.recv(), decoder_conn.recv(),
                              trial)
                on_progress(split)
                results.append(split)
        return Ceiling(results, cpus, pinned, repeat, oversubscribed, mode)
    finally:
        for conn in (backbone_conn, decoder_conn):
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for side in sides:
            if side.pid is None:
                continue
            side.join(10)
            if side.is_alive():
                side.kill()
        if pin_to is not None:
            os.sched_setaffinity(0, previous_affinity)


def family_models(models_dir: Path, family: str) -> tuple[Path, Path]:
    """The backbone and codec folder a family's ceiling measures: Orpheus's from
    MODELS (demo models built when missing), NeuTTS-Air's from MODELS/neutts (its demo
    built beside demo models, as `chorus serve` builds it)."""
    from tools.supervisor import locate_models

    models = locate_models(models_dir)
    if family == ORPHEUS:
        return models.gguf, models.snac_dir
    from tools.demo_models.neutts_demo import NeuTtsDemo, build_neutts_demo

    demo = build_neutts_demo(Path(models_dir) / "neutts") if models.demo else NeuTtsDemo(Path(models_dir) / "neutts")
    if not (demo.gguf.is_file() and demo.neucodec_dir.is_dir()):
        raise FileNotFoundError(f"{demo.root} must hold backbone.gguf and neucodec/ for the NeuTTS-Air ceiling")
    return demo.gguf, demo.neucodec_dir


def progress_line(s: Split) -> str:
    return (f"trial {s.trial + 1} batch {s.batch} llama {s.llama_threads} torch {s.torch_threads} "
            f"fps {s.frames_per_step}: {s.backbone_audio_s:.2f} / {s.decoder_audio_s:.2f}")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `benchmarks/ceiling.py` and `chorus bench` share, spelled the same in both."""
    parser.add_argument("--repeat", type=positive_int, default=3,
                        help="runs of every measured cell; figures are the median [min-max] (default 3)")
    parser.add_argument("--decoder-precision", default="auto", choices=DECODER_PRECISIONS,
                        help="decoder precision, as the codec worker's option of that name: auto (bf16 on CPUs "
                             "with native bf16, else fp32), fp32 or bf16 (default auto)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive count")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--models", type=Path, default=Path("models/demo"), help="demo models folder (built if missing)")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per trial")
    p.add_argument("--frames", type=int, default=60, help="frames per request")
    p.add_argument("--frames-per-step", default="1,2", help="decoder frames per stream per step to try")
    p.add_argument("--cpus", type=positive_int, default=None,
                   help="pin both sides to this many CPUs and search the splits that fit them "
                        "(a smaller deployment measured on a larger machine); default: this process's budget")
    p.add_argument("--oversubscribed", action="store_true",
                   help="also measure splits with more threads than CPUs (chorus serve picks none on 2 CPUs or more)")
    add_common_arguments(p)
    p.add_argument("--family", choices=(ORPHEUS, "neutts-air"), default=ORPHEUS,
                   help="the model family to measure (neutts-air: the NeuTTS-Air demo models in MODELS/neutts, "
                        "built if missing; --frames then counts NeuCodec frames)")
    p.add_argument("--json", type=Path)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)

    backbone, codec_dir = family_models(args.models, args.family)
    ceiling = measure(
        backbone, codec_dir, [int(b) for b in args.batches.split(",")], args.seconds, args.frames,
        tuple(int(f) for f in args.frames_per_step.split(",")), cpus=args.cpus, repeat=args.repeat,
        oversubscribed=args.oversubscribed, decoder_precision=args.decoder_precision,
        on_progress=lambda s: print(progress_line(s), flush=True), family=args.family,
    )
    print(ceiling.table())
    if args.json:
        args.json.write_text(json.dumps(ceiling.as_json(), indent=2))


if __name__ == "__main__":
    main()
