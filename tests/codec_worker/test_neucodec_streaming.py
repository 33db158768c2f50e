"""NeuCodec's decoder and its streaming form, on the demo decoder (random weights in the
real wire shape: 65,536 codes, hop 480, 24 kHz; the body scaled down)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from services.codec_worker.neucodec_model import (
    NeuCodecDecoder,
    NeuCodecLoadError,
    NeuCodecShape,
    istft_same,
    load_neucodec,
)
from services.codec_worker.neucodec_streaming import OverlapAdd, StreamingNeuCodec
from tools.demo_models.neucodec_dir import DEMO_SHAPE, write_demo_neucodec

FRAMES = 83  # not a multiple of any chunk below


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_demo_neucodec(tmp_path_factory.mktemp("neucodec"), seed=3)


@pytest.fixture(scope="module")
def model(model_dir) -> NeuCodecDecoder:
    return load_neucodec(model_dir)


def random_codes(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, DEMO_SHAPE.codebook_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def stream(model, codes, splits, **grid) -> tuple[np.ndarray, int | None]:
    """The stream's audio and the frames its first audio waited for."""
    decoder = StreamingNeuCodec(model, **grid)
    parts, first, i = [], None, 0
    for size in splits:
        out = decoder.push(codes[i : i + size])
        i += size
        if first is None and out.size:
            first = i
        parts.append(out)
    assert i == len(codes)
    parts.append(decoder.finish())
    return np.concatenate(parts), first


def random_splits(n: int, rng: random.Random) -> list[int]:
    splits = []
    while n:
        splits.append(min(n, rng.randint(1, 9)))
        n -= splits[-1]
    return splits


def snr_db(audio: np.ndarray, reference: np.ndarray) -> float:
    noise = float(np.sum((audio.astype(np.float64) - reference) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(reference.astype(np.float64) ** 2)) / noise)


def test_one_pass_depends_on_every_code_so_no_stream_can_equal_it_exactly(model):
    """Why the streaming decoder is measured against the one-pass decode rather than
    equal to it: changing the last code moves the first samples (GroupNorm over time,
    bidirectional attention), so any decoder that emits the start before the end is
    in cannot reproduce them."""
    codes = random_codes(40)
    changed = codes[:-1] + [(codes[-1] + 1) % DEMO_SHAPE.codebook_size]
    first = model.decode(torch.tensor([codes]))[0, :480]
    assert not torch.equal(first, model.decode(torch.tensor([changed]))[0, :480])


def test_overlap_add_of_the_one_pass_spectra_is_the_one_pass_audio_however_frames_arrive(model):
    """The inverse STFT adds no error of its own: fed the one-pass spectra, in any
    grouping, it gives the one-pass audio to float rounding, and the same bits for
    every grouping."""
    codes = torch.tensor([random_codes(FRAMES, seed=1)])
    with torch.inference_mode():
        frames = model.frames_to_time(model.spectra(codes))
        reference = istft_same(frames, model.generator.head.istft.window, 480)[0].numpy()
    frames = frames[0].numpy()
    outputs = []
    for splits in ([FRAMES], [1] * FRAMES, random_splits(FRAMES, random.Random(5))):
        ola = OverlapAdd(model.generator.head.istft.window, 480)
        parts, i = [], 0
        for size in splits:
            parts.append(ola.push(frames[:, i : i + size]))
            i += size
        parts.append(ola.finish())
        outputs.append(np.concatenate(parts))
    assert outputs[0].size == reference.size == FRAMES * 480
    assert np.max(np.abs(outputs[0] - reference)) <= 1e-6 * np.max(np.abs(reference))
    assert all(np.array_equal(outputs[0], other) for other in outputs[1:])


def test_the_same_codes_give_the_same_bits_however_they_are_pushed_and_nothing_is_lost(model):
    codes = random_codes(FRAMES, seed=2)
    rng = random.Random(7)
    whole, _ = stream(model, codes, [FRAMES])
    assert whole.size == FRAMES * 480  # as many samples as the one-pass decode
    for splits in ([1] * FRAMES, random_splits(FRAMES, rng), random_splits(FRAMES, rng)):
        audio, _ = stream(model, codes, splits)
        assert np.array_equal(audio, whole), splits


def test_first_audio_comes_after_the_first_chunk_plus_lookahead_frames(model):
    codes = random_codes(FRAMES, seed=4)
    for first_chunk, chunk, lookahead in ((8, 24, 4), (4, 4, 0), (25, 25, 5), (None, 10, 2)):
        decoder = StreamingNeuCodec(model, chunk=chunk, lookback=16, lookahead=lookahead, first_chunk=first_chunk)
        audio, first = stream(model, codes, [1] * FRAMES, chunk=chunk, lookback=16, lookahead=lookahead,
                              first_chunk=first_chunk)
        assert first == (first_chunk or chunk) + lookahead == decoder.first_audio_frames
        assert audio.size == FRAMES * 480


def test_every_frame_goes_through_the_model_in_one_window_of_the_grid(model):
    """Cost: a window a chunk, each as long as its context allows, so the default grid
    runs about (48 + 24 + 4) / 24 frames through the model a frame."""
    decoder = StreamingNeuCodec(model)  # first chunk 8, then 24, back 48, ahead 4
    decoder.push(random_codes(200, seed=9))
    decoder.finish()
    # chunks end at 8, 32, 56, ..., 200: 1 + 8 windows
    assert decoder.windows == 9
    expected = sum(min(200, end + 4) - max(0, start - 48)
                   for start, end in zip([0, 8, *range(32, 200, 24)], [8, *range(32, 201, 24)]))
    assert decoder.window_frames == expected


def test_with_context_over_the_whole_stream_the_stream_is_the_one_pass_decode(model):
    """Every difference from the one-pass decode is the windows' missing context: with
    a window covering the whole stream the audio is the one-pass audio to rounding,
    and a wider lookahead brings it closer than a narrow one."""
    codes = random_codes(FRAMES, seed=6)
    reference = model.decode(torch.tensor([codes]))[0].numpy()
    full, _ = stream(model, codes, [FRAMES], chunk=8, lookback=FRAMES, lookahead=FRAMES)
    assert snr_db(full, reference) > 100
    narrow, _ = stream(model, codes, [FRAMES], chunk=8, lookback=48, lookahead=0)
    wide, _ = stream(model, codes, [FRAMES], chunk=8, lookback=48, lookahead=8)
    assert snr_db(narrow, reference) < snr_db(wide, reference) < 100


def test_short_and_empty_streams(model):
    codes = random_codes(3, seed=8)
    decoder = StreamingNeuCodec(model)
    assert decoder.push(codes).size == 0  # fewer frames than the first chunk needs
    tail = decoder.finish()
    assert tail.size == 3 * 480
    assert snr_db(tail, model.decode(torch.tensor([codes]))[0].numpy()) > 100  # the whole stream was its window
    assert StreamingNeuCodec(model).finish().size == 0


def test_bad_codes_and_misuse_are_refused(model):
    decoder = StreamingNeuCodec(model)
    for bad in ([-1], [DEMO_SHAPE.codebook_size], [2**63 - 1]):
        with pytest.raises(ValueError, match="NeuCodec code is in"):
            decoder.push(bad)
    assert decoder.push([1, 2]).size == 0  # a refused push left nothing behind
    assert decoder.finish().size == 2 * 480
    with pytest.raises(RuntimeError, match="finished"):
        decoder.push([1])
    with pytest.raises(ValueError, match="chunk"):
        StreamingNeuCodec(model, chunk=0)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 65536\)"):
        model.spectra(torch.tensor([[70000]]))


def test_a_checkpoint_with_the_encoder_loads_its_decoder_and_a_short_one_is_refused(model_dir, tmp_path):
    """A real neucodec checkpoint also holds the encoder and the quantizer's buffers:
    they are skipped. One missing decoder tensor is an error that names it."""
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    extra = {**state, "CodecEnc.conv_blocks.0.weight": torch.zeros(2), "generator.quantizer.scales": torch.ones(1, 8),
             "semantic_model.encoder.layers.0.ffn.weight": torch.zeros(3)}
    torch.save(extra, tmp_path / "pytorch_model.bin")
    loaded = load_neucodec(tmp_path)
    codes = torch.tensor([random_codes(12)])
    assert torch.equal(loaded.decode(codes), load_neucodec(model_dir).decode(codes))
    del state["generator.backbone.transformers.0.mlp.fc1.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(NeuCodecLoadError, match="lacks 1 decoder tensors.*mlp.fc1.weight"):
        load_neucodec(tmp_path)


@pytest.mark.parametrize(
    "config, weights, message",
    [
        (None, b"", "has no config.json"),
        ('{"hidden": 250, "heads": 4}', b"", "hidden .250. must be a multiple of norm_groups"),
        ('{"hiden": 256}', b"", "unknown config keys"),
        ("[1, 2]", b"", "not a JSON object"),
        ("{}", b"not a checkpoint", "cannot be read as a checkpoint"),
    ],
)
def test_a_bad_directory_is_refused_with_its_reason(tmp_path, config, weights, message):
    if config is not None:
        (tmp_path / "config.json").write_text(config)
    (tmp_path / "pytorch_model.bin").write_bytes(weights)
    with pytest.raises(NeuCodecLoadError, match=message):
        load_neucodec(tmp_path)


def test_weights_of_another_shape_are_refused(model_dir, tmp_path):
    (tmp_path / "config.json").write_text(NeuCodecShape(hidden=128, depth=4, heads=4).to_json())
    (tmp_path / "pytorch_model.bin").write_bytes((model_dir / "pytorch_model.bin").read_bytes())
    with pytest.raises(NeuCodecLoadError, match="does not match"):
        load_neucodec(tmp_path)


def test_the_demo_writer_gives_the_same_bytes_for_the_same_seed(model_dir, tmp_path):
    again = write_demo_neucodec(tmp_path, seed=3)
    assert (again / "pytorch_model.bin").read_bytes() == (model_dir / "pytorch_model.bin").read_bytes()
    assert NeuCodecShape.from_json((again / "config.json").read_text()) == DEMO_SHAPE


def test_the_benchmark_compares_both_schemes_on_the_same_codes(model):
    """benchmarks/neucodec_streaming.py's arms, as docs/benchmarks.md reports them: the
    rebuilt neutts scheme yields a frame more than its codes, Chorus's none, and on
    the same windows Chorus's audio is nearer the one-pass decode."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "neucodec_streaming.py"
    spec = importlib.util.spec_from_file_location("neucodec_streaming_bench", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    codes = random_codes(120, seed=10)
    reference = model.decode(torch.tensor([codes]))[0].numpy()
    neutts = bench.neutts_arm(model, codes)
    ours = bench.chorus_arm(model, codes, 25, 50, 5)
    assert neutts.audio.size == reference.size + 480
    assert ours.audio.size == reference.size
    assert neutts.first_audio_frames == ours.first_audio_frames == 30
    assert bench.snr_db(ours.audio, reference) > bench.snr_db(neutts.audio, reference)


def test_a_streams_bits_hold_whatever_shares_its_step_and_however_many_threads_decode(model):
    """Within one numeric mode (this CPU's MKL kernels): the engine may hand a stream's
    frames over in any grouping, beside any other stream, on 1 or 2 torch threads, and
    its audio is the same to the last bit. Each stream decodes in its own forwards, so
    a batch partner cannot change it; thread counts are measured, not assumed."""
    from services.codec_worker.neucodec_streaming import NeuCodecStreams

    first, second = (np.array(random_codes(FRAMES, seed=s)).reshape(-1, 1) for s in (11, 12))

    def decoded(threads: int, steps: list[int], partner: np.ndarray | None) -> np.ndarray:
        torch.set_num_threads(threads)
        streams = NeuCodecStreams(model)
        mine, other = streams.new_stream(), streams.new_stream()
        parts, i = [], 0
        for size in steps:
            work = [(mine, first[i : i + size])] + ([(other, partner[i : i + size])] if partner is not None else [])
            chunk = streams.decode(work)[0]
            i += size
            parts.append(chunk.samples if chunk is not None else np.zeros(0, np.float32))
        tail = streams.flush(mine)
        return np.concatenate(parts + [tail.samples if tail is not None else np.zeros(0, np.float32)])

    alone = decoded(1, [FRAMES], None)
    assert alone.size == FRAMES * 480
    assert np.array_equal(decoded(2, [FRAMES], None), alone)
    assert np.array_equal(decoded(1, random_splits(FRAMES, random.Random(3)), second), alone)
    assert np.array_equal(decoded(2, [1] * FRAMES, second), alone)


def test_a_resumed_stream_replays_from_frame_0_and_sends_only_what_was_not_relayed(model):
    from services.codec_worker.neucodec_streaming import NeuCodecStreams

    codes = np.array(random_codes(40, seed=13)).reshape(-1, 1)
    streams = NeuCodecStreams(model)
    whole = streams.new_stream()
    full = [streams.decode([(whole, codes)])[0], streams.flush(whole)]
    full_audio = np.concatenate([c.samples for c in full if c is not None])
    resumed = streams.new_stream(resume_from_sample=5000)
    chunks = [c for c in (streams.decode([(resumed, codes)])[0], streams.flush(resumed)) if c is not None]
    assert chunks[0].sample_offset == 5000
    assert np.array_equal(np.concatenate([c.samples for c in chunks]), full_audio[5000:])
    with pytest.raises(ValueError, match="starts at frame 0"):
        streams.new_stream(first_frame_index=3)
