"""The gateway's event loop stays free: text segmentation and audio encoding run on
worker threads, so one client's pathological text or many streams' FFmpeg work never
stall another client's call (issue 9 defect 2, issue 12 item 6).

The real gateway in this process against a fake token server; pysbd and the encoder
are wrapped only to observe (and, for one test, to hold) the real calls.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pysbd

from chorus.proto.tts.v1 import gateway_pb2
from chorus.speech.orpheus import SAMPLES_PER_FRAME
from gateway.encoding import StreamEncoder
from fake_token_server import FakeTokenService, collect, gateway, token_server

PATHOLOGICAL = "a" + "." * 19_999  # took 12 s and stalled GetLimits for 6.8 s


def test_pathological_texts_complete_while_getlimits_answers(monkeypatch):
    """Three such texts at once: while their segmentation is held on its worker
    thread, GetLimits is answered; then all three complete with their audio."""
    entered = threading.Event()
    gate = threading.Event()
    released = threading.Event()  # set once the held segmentation goes on
    real_segment = pysbd.Segmenter.segment

    def held_segment(self, text):
        if len(text) > 100 and not gate.is_set():
            entered.set()
            gate.wait(60)  # a fallback, so a regression fails instead of hanging
            released.set()
        return real_segment(self, text)

    monkeypatch.setattr(pysbd.Segmenter, "segment", held_segment)

    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address]) as stub:
            calls = [
                asyncio.ensure_future(collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text=PATHOLOGICAL))))
                for _ in range(3)
            ]
            assert await asyncio.to_thread(entered.wait, 60), "no segmentation started"
            limits = await stub.GetLimits(gateway_pb2.GetLimitsRequest(), timeout=60)
            # Answered while a segmentation was still held: it was not on the event loop.
            assert not released.is_set()
            assert limits.max_text_chars == 20_000
            assert not any(call.done() for call in calls)
            gate.set()
            results = await asyncio.gather(*calls)
            for audio, summary, _ in results:
                assert summary.frames > 0
                assert len(audio) // 2 == summary.frames * SAMPLES_PER_FRAME
            # The dots are not spoken; the one letter is, once per call.
            assert len(fake.requests) == 3

    asyncio.run(scenario())


def test_pathological_texts_unheld_complete_and_limits_answer_meanwhile():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address]) as stub:
            texts = [PATHOLOGICAL, "a. " * 6_666, "Mr. A. (b) 1.2 e.g. ? ! " * 800]
            calls = [
                asyncio.ensure_future(collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text=t), timeout=300)))
                for t in texts
            ]
            answered = 0
            while not all(call.done() for call in calls):
                await stub.GetLimits(gateway_pb2.GetLimitsRequest(), timeout=60)
                answered += 1
                await asyncio.sleep(0.01)
            for call in calls:
                audio, summary, _ = call.result()
                assert len(audio) // 2 == summary.frames * SAMPLES_PER_FRAME > 0
            assert answered >= 1

    asyncio.run(scenario())


def test_audio_is_encoded_off_the_event_loop_in_order(monkeypatch):
    threads = []
    real_encode = StreamEncoder.encode

    def observed_encode(self, pcm):
        threads.append(threading.current_thread())
        return real_encode(self, pcm)

    monkeypatch.setattr(StreamEncoder, "encode", observed_encode)

    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address]) as stub:
            text = " ".join(f"Sentence {i} is here." for i in range(6))
            request = gateway_pb2.SynthesizeRequest(
                text=text, audio=gateway_pb2.AudioConfig(encoding=gateway_pb2.AUDIO_ENCODING_PCM_S16LE)
            )
            audio, summary, _ = await collect(stub.Synthesize(request, timeout=60))
            return np.frombuffer(audio, "<i2"), summary, threading.current_thread()

    pcm, summary, loop_thread = asyncio.run(scenario())
    assert threads and all(t is not loop_thread and t.name.startswith("chorus-encoder") for t in threads)
    # In order: each piece's constant (see the fake) appears in piece order.
    levels = [v for v in np.unique(pcm) if v % 100 == 0 and v > 0]
    first_seen = sorted(levels, key=lambda v: int(np.argmax(pcm == v)))
    assert first_seen == sorted(levels)
    assert pcm.size == summary.frames * SAMPLES_PER_FRAME
