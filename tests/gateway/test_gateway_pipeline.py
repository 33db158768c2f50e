"""Synthesize through the real gateway: a text cut into pieces, pipelined in order, joined
without gaps, seeded and encoded.
"""

from __future__ import annotations

import io

import pytest
import soundfile as sf

from chorus.proto.tts.v1 import common_pb2, gateway_pb2
from chorus.speech.orpheus import SAMPLES_PER_FRAME
from gateway.joins import FADE_SAMPLES
from gateway.segmenter import split_text

from fake_token_server import FakeTokenService, PCM, TWENTY_SENTENCES, collect, gateway, in_order, piece_value, pieces_of, run, token_server, wait_until


def test_synthesize_relays_audio_then_one_summary():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address]) as stub:
            request = gateway_pb2.SynthesizeRequest(text="Hello there, gateway.", audio=PCM, request_id="req-1")
            audio, summary, count = await collect(stub.Synthesize(request))
        frames = fake.frames_for("Hello there, gateway.")
        assert len(audio) == frames * SAMPLES_PER_FRAME * 2
        assert count >= 2
        assert summary.request_id == "req-1"
        assert summary.frames == frames and summary.tokens == 7 * frames
        assert summary.audio_seconds == pytest.approx(frames * SAMPLES_PER_FRAME / 24000)
        assert summary.time_to_first_audio_ms > 0
        assert 0 < summary.time_to_first_token_ms <= summary.time_to_first_audio_ms
        assert summary.real_time_factor > 0
        assert summary.finish_reason == "end_of_speech"
        assert summary.trace_id == ""
        assert fake.requests[0].voice == "tara"  # the default voice
        assert fake.requests[0].request_id == "req-1.0"

    run(scenario())


def test_long_text_is_pipelined_in_order_with_no_gap():
    async def scenario():
        fake = FakeTokenService(frame_delay_s=0.002)
        async with token_server(fake) as address, gateway([address], segment_target_chars=120) as stub:
            request = gateway_pb2.SynthesizeRequest(text=TWENTY_SENTENCES, audio=PCM)
            audio, summary, _ = await collect(stub.Synthesize(request))
        texts = [r.text for r in in_order(fake)]
        assert texts == split_text(TWENTY_SENTENCES, 120)
        assert len(texts) > 5
        # The audio is the pieces back to back: nothing inserted, nothing dropped.
        pieces = pieces_of(audio, fake)
        assert summary.frames == sum(fake.frames_for(t) for t in texts)
        assert len(audio) == summary.frames * SAMPLES_PER_FRAME * 2
        for index, piece in enumerate(pieces):
            assert (piece[FADE_SAMPLES:-FADE_SAMPLES] == piece_value(index)).all(), f"piece {index} out of place"
            # Faded at both ends, so no join steps: the edge samples are near zero.
            assert abs(int(piece[0])) < piece_value(index) / 10 and abs(int(piece[-1])) < piece_value(index) / 10
        # One piece ahead of the one being relayed (lookahead 1), never more.
        assert fake.max_active == 2

    run(scenario())


def test_a_five_minute_text_starts_with_its_first_sentence_alone():
    async def scenario():
        fake = FakeTokenService(frame_delay_s=0.001)
        five_minutes = "Short start. " + " ".join(f"Then comes sentence {i} of a long read." for i in range(120))
        async with token_server(fake) as address, gateway([address]) as stub:
            call = stub.Synthesize(gateway_pb2.SynthesizeRequest(text=five_minutes, audio=PCM))
            await call.read()
            await wait_until(lambda: ("start", 1) in fake.events, "the second piece to start")
            call.cancel()
        assert in_order(fake)[0].text == "Short start."
        # The second piece starts only after the first one's audio: nothing competes
        # with the first piece for the backbone before the first audio.
        assert fake.events.index(("audio", 0)) < fake.events.index(("start", 1))

    run(scenario())


def test_seed_is_passed_down_distinct_per_piece():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address], segment_target_chars=60) as stub:
            sampling = common_pb2.SamplingParams(temperature=0.5, seed=7)
            request = gateway_pb2.SynthesizeRequest(text=TWENTY_SENTENCES[:200], sampling=sampling)
            await collect(stub.Synthesize(request))
        seeds = sorted(r.sampling.seed for r in fake.requests)
        assert seeds == list(range(7, 7 + len(fake.requests)))
        assert all(r.sampling.temperature == pytest.approx(0.5) for r in fake.requests)

    run(scenario())


def test_a_request_without_a_seed_gets_one_and_the_summary_reports_it():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address], segment_target_chars=60) as stub:
            _, unseeded, _ = await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text=TWENTY_SENTENCES[:200])))
            first = sorted(r.sampling.seed for r in fake.requests)
            fake.requests.clear()
            sampling = common_pb2.SamplingParams(temperature=0.5)  # sampling set, seed not
            _, other, _ = await collect(
                stub.Synthesize(gateway_pb2.SynthesizeRequest(text=TWENTY_SENTENCES[:200], sampling=sampling))
            )
            second = sorted(r.sampling.seed for r in fake.requests)
        return unseeded, first, other, second

    unseeded, first, other, second = run(scenario())
    assert all(r for r in (first, second)) and len(first) > 1
    # Each piece derives its own seed from the request's, which the summary reports.
    assert first == list(range(unseeded.seed, unseeded.seed + len(first)))
    assert second == list(range(other.seed, other.seed + len(second)))
    assert unseeded.seed != other.seed  # drawn per request


def test_encoded_output_is_resampled_and_decodes():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address]) as stub:
            audio = gateway_pb2.AudioConfig(encoding=gateway_pb2.AUDIO_ENCODING_WAV, sample_rate_hz=16000)
            data, summary, _ = await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello.", audio=audio)))
        samples, rate = sf.read(io.BytesIO(data), dtype="int16")
        assert rate == 16000
        expected = round(summary.frames * SAMPLES_PER_FRAME * 16000 / 24000)
        assert abs(samples.size - expected) <= 1
        assert summary.audio_seconds == pytest.approx(samples.size / 16000)

    run(scenario())
