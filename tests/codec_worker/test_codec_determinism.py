"""The streaming decoder is bit-exact however it is driven, and its noise is keyed.

A stream's float32 audio, and so its int16 PCM, must be the same to the last bit
however its frames are split into steps, whichever streams share its forwards, with
any number of torch threads, and after a resume from zero state with 3 frames of
context: that is what lets a request survive a codec worker's death sample for
sample. Noise on, seeded, throughout: the noise must be a function of (seed, layer,
absolute position), never of a generator's history.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chorus.speech.orpheus import CODEBOOK_SIZE, CODES_PER_FRAME, SAMPLES_PER_FRAME
from services.codec_worker import keyed_noise
from services.codec_worker.channel_mix import ChannelMix
from services.codec_worker.decode_engine import Audio, DecodeEngine, End, to_pcm16
from services.codec_worker.model import load_snac
from services.codec_worker.streaming_decoder import StreamingSnacDecoder

pytestmark = pytest.mark.slow  # over 15 s: started first (tests/conftest.py)

N_FRAMES = 16
SEED = 2**64 - 12345  # a seed above 2^63 too


@pytest.fixture(scope="module")
def decoder(snac_dir):
    # fp32, pinned (the worker's "auto" may pick bf16); bf16's own bits are tested in
    # tests/codec_worker/test_decoder_precision.py.
    return StreamingSnacDecoder(load_snac(snac_dir, device="cpu").model, precision="fp32")


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def random_frames(seed: int, n: int = N_FRAMES) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CODEBOOK_SIZE, (n, CODES_PER_FRAME))


def run(decoder, streams, schedule, threads: int = 1) -> list[tuple[int, np.ndarray]]:
    """streams: dicts of frames + new_stream arguments; schedule(step) -> [(stream, n frames)].
    Returns each stream's (first sample offset, float32 audio), checked contiguous."""
    torch.set_num_threads(threads)
    states = [decoder.new_stream(**{k: v for k, v in s.items() if k != "frames"}) for s in streams]
    next_frame = [s.first_frame_index for s in states]
    chunks: list[list] = [[] for _ in streams]
    step = 0
    while any(n < len(s["frames"]) for n, s in zip(next_frame, streams)):
        items, members = [], []
        for k, count in schedule(step):
            frames = streams[k]["frames"][next_frame[k] : next_frame[k] + count]
            if len(frames):
                items.append((states[k], frames))
                members.append(k)
                next_frame[k] += len(frames)
        if items:
            for k, chunk in zip(members, decoder.decode(items)):
                if chunk is not None:
                    chunks[k].append(chunk)
        step += 1
    out = []
    for k, state in enumerate(states):
        tail = decoder.flush(state)
        if tail is not None:
            chunks[k].append(tail)
        offset = chunks[k][0].sample_offset
        for a, b in zip(chunks[k], chunks[k][1:]):
            assert b.sample_offset == a.sample_offset + len(a.samples), "chunks must be contiguous"
        out.append((offset, np.concatenate([c.samples for c in chunks[k]])))
    return out


def assert_bit_identical(reference: tuple[int, np.ndarray], got: tuple[int, np.ndarray]) -> None:
    (ref_offset, ref), (offset, audio) = reference, got
    expected = ref[offset - ref_offset :]
    assert audio.dtype == expected.dtype == np.float32
    assert len(audio) == len(expected) > 0
    differing = np.flatnonzero(audio.view(np.int32) != expected.view(np.int32))
    assert differing.size == 0, (
        f"{differing.size} of {len(audio)} samples differ in their bits, first at {offset + differing[0]}, "
        f"max {np.abs(audio - expected).max():.3g}"
    )
    assert to_pcm16(audio) == to_pcm16(expected)


STREAM = dict(frames=random_frames(1), seed=SEED)
PARTNERS = [dict(frames=random_frames(k), seed=k, deterministic=k % 3 == 0) for k in range(2, 17)]


@pytest.fixture(scope="module")
def reference(decoder):
    """One frame a step, alone, one thread."""
    return run(decoder, [STREAM], lambda step: [(0, 1)])[0]


IRREGULAR = [1, 3, 2, 5, 1, 1, 7, 16, 2]


@pytest.mark.parametrize(
    "schedule",
    [lambda step: [(0, 2)], lambda step: [(0, 5)], lambda step: [(0, 16)],
     lambda step: [(0, IRREGULAR[step % len(IRREGULAR)])]],
    ids=["2-frame steps", "5-frame steps", "16-frame steps", "irregular steps"],
)
def test_chunking_changes_no_bit(decoder, reference, schedule):
    assert_bit_identical(reference, run(decoder, [STREAM], schedule)[0])


def test_batch_partners_change_no_bit(decoder, reference):
    # 16 streams in one forward, partners with and without noise.
    assert_bit_identical(reference, run(decoder, [STREAM, *PARTNERS], lambda step: [(k, 1) for k in range(16)])[0])
    # Partners that join later and feed uneven chunks: forwards of changing size and makeup.
    staggered = run(decoder, [STREAM, *PARTNERS[:5]], lambda step: [(k, 1 + (step + k) % 3) for k in range(6) if step >= k])
    assert_bit_identical(reference, staggered[0])


@pytest.mark.parametrize("threads", [2, 3])
def test_thread_count_changes_no_bit(decoder, reference, threads):
    got = run(decoder, [STREAM, *PARTNERS[:2]], lambda step: [(k, 4) for k in range(3)], threads=threads)
    assert_bit_identical(reference, got[0])


@pytest.mark.parametrize("resume_frame,chunk", [(3, 1), (9, 4), (14, 1)])
def test_a_resume_from_zero_state_continues_bit_for_bit(decoder, reference, resume_frame, chunk):
    # Failover: a fresh decoder gets 3 frames before the resume point and drops what
    # was relayed; the resume point may fall anywhere in a frame.
    resume_sample = resume_frame * SAMPLES_PER_FRAME + 777
    resumed = dict(STREAM, first_frame_index=resume_frame - 3, resume_from_sample=resume_sample)
    got = run(decoder, [resumed], lambda step: [(0, chunk)])[0]
    assert got[0] == resume_sample
    assert_bit_identical(reference, got)


def test_a_resume_in_a_batch_continues_bit_for_bit(decoder, reference):
    resumed = dict(STREAM, first_frame_index=6, resume_from_sample=9 * SAMPLES_PER_FRAME)
    got = run(decoder, [resumed, *PARTNERS[:3]], lambda step: [(k, 1 + k % 2) for k in range(4)])[0]
    assert_bit_identical(reference, got)


def test_the_seed_is_the_noise(decoder, reference):
    again = run(decoder, [STREAM], lambda step: [(0, 1)])[0]
    other_seed = run(decoder, [dict(STREAM, seed=SEED - 1)], lambda step: [(0, 1)])[0]
    quiet = run(decoder, [dict(STREAM, deterministic=True)], lambda step: [(0, 1)])[0]
    assert_bit_identical(reference, again)
    pcm = [np.frombuffer(to_pcm16(audio), "<i2") for _, audio in (reference, other_seed, quiet)]
    assert np.mean(pcm[0] != pcm[1]) > 0.5
    assert np.mean(pcm[0] != pcm[2]) > 0.5


def test_engine_streams_with_one_seed_give_one_pcm_however_fed(decoder):
    frames = random_frames(5, 10)

    async def scenario():
        engine = DecodeEngine(decoder, max_batch=4, batch_wait_ms=0.0)
        engine.start()
        try:
            # The same codes and seed, fed 1, 3 and all 10 frames at a time, beside a
            # stream of other codes: each step batches them differently.
            handles = [engine.open_stream(seed=SEED) for _ in range(3)]
            other = engine.open_stream(seed=1)
            for lo in range(0, 10):
                handles[0].submit(frames[lo : lo + 1])
                if lo % 3 == 0:
                    handles[1].submit(frames[lo : lo + 3])
                other.submit(random_frames(6, 1))
                await asyncio.sleep(0)
            handles[2].submit(frames)
            for handle in (*handles, other):
                handle.finish()
            return await asyncio.gather(*(pcm_of(h) for h in handles))
        finally:
            await engine.aclose()

    pcms = asyncio.run(scenario())
    assert len(pcms[0]) == 10 * SAMPLES_PER_FRAME * 2
    assert pcms[0] == pcms[1] == pcms[2]


async def pcm_of(stream) -> bytes:
    parts, expected = [], 0
    while not isinstance(item := await stream.get(), End):
        assert isinstance(item, Audio), item
        assert item.sample_offset == expected
        expected += item.samples
        parts.append(item.pcm)
    return b"".join(parts)


# --- keyed noise ---------------------------------------------------------------------

_MASK = 2**64 - 1
_GAMMA = 0x9E3779B97F4A7C15


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def reference_gaussian(seed: int, layer: int, position: int) -> np.float32:
    """keyed_noise's definition, in plain Python integers."""
    key = _mix(_mix((seed + _GAMMA) & _MASK) ^ (((layer + 1) * _GAMMA) & _MASK))
    total = 0
    for word in range(2):
        z = _mix((key + (2 * position + word) * _GAMMA) & _MASK)
        total += sum((z >> shift) & 0xFFFF for shift in (0, 16, 32, 48))
    scale = np.float32(1.0 / (2.0 * math.sqrt(8 * (65536.0**2 - 1.0) / 12.0)))
    return np.float32(2 * total - 8 * 65535) * scale


def test_noise_is_its_definition_at_any_position():
    seeds = np.array([0, 7, 2**64 - 1], dtype=np.uint64)
    for layer in (0, 3):
        keys = keyed_noise.layer_keys(seeds, layer)
        starts = np.array([0, 5, 2**40])
        values = keyed_noise.gaussian(keys, starts, 6)
        for b, seed in enumerate(seeds):
            expected = [reference_gaussian(int(seed), layer, int(starts[b]) + i) for i in range(6)]
            assert values[b].tobytes() == np.array(expected, dtype=np.float32).tobytes()


def test_noise_depends_on_position_only_not_on_how_it_is_drawn():
    keys = keyed_noise.layer_keys(np.array([3, 3], dtype=np.uint64), 1)
    whole = keyed_noise.gaussian(keys[:1], np.array([100]), 1000)[0]
    parts = np.concatenate([keyed_noise.gaussian(keys[:1], np.array([100 + lo]), n)[0]
                            for lo, n in ((0, 1), (1, 17), (18, 982))])
    batched = keyed_noise.gaussian(keys, np.array([100, 600]), 400)
    assert whole.tobytes() == parts.tobytes()
    assert batched[0].tobytes() == whole[:400].tobytes()
    assert batched[1].tobytes() == whole[500:900].tobytes()


def test_noise_streams_differ_by_seed_and_layer_and_are_unit_gaussian():
    draws = {
        (seed, layer): keyed_noise.gaussian(keyed_noise.layer_keys(np.array([seed], dtype=np.uint64), layer),
                                            np.array([0]), 200_000)[0]
        for seed, layer in ((1, 0), (2, 0), (1, 1))
    }
    values = list(draws.values())
    for a in range(3):
        for b in range(a + 1, 3):
            assert abs(np.corrcoef(values[a], values[b])[0, 1]) < 0.01
    for v in values:
        assert abs(v.mean()) < 0.01 and abs(v.std() - 1) < 0.01
        assert np.abs(v).max() < 4.9
        assert abs(np.mean(v**4) - 3) < 0.2  # near Gaussian kurtosis (Irwin-Hall 8: 2.85)


def test_noise_rejects_negative_positions():
    with pytest.raises(ValueError, match=">= 0"):
        keyed_noise.gaussian(np.array([1], dtype=np.uint64), np.array([-1]), 3)


# --- channel mixes -------------------------------------------------------------------


@pytest.mark.parametrize("steps_per_frame", [4, 256], ids=["by rows", "by columns"])
@pytest.mark.parametrize("out_channels,bias", [(64, True), (7, False)])
def test_a_channel_mix_gives_each_step_the_same_bits_in_any_batch(steps_per_frame, out_channels, bias):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_channels, 48, generator=gen)
    b = torch.randn(out_channels, generator=gen) if bias else None
    mix = ChannelMix(weight, b, steps_per_frame)
    assert mix.by_rows == (steps_per_frame < 16)
    x = torch.randn(5, 48, 300, generator=gen)
    torch.set_num_threads(1)
    whole = mix(x)
    expected = F.conv1d(x, weight[..., None], b)
    assert whole.shape == expected.shape
    assert torch.allclose(whole, expected, atol=1e-4)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch, lo, steps in ((1, 0, 1), (1, 7, 3), (2, 100, 17), (5, 3, 40), (3, 0, 300)):
            part = mix(x[:batch, :, lo : lo + steps].contiguous())
            assert torch.equal(part, whole[:batch, :, lo : lo + steps]), (threads, batch, lo, steps)
