"""`nvidia.riva.tts.RivaSpeechSynthesis` served by Chorus: Riva's messages mapped onto
the gateway's pipeline, so a program written for `nvidia-riva-client` speaks unchanged.

The mapping (README.md lists it for users):
- `voice_name`: Chorus's voices by name, or Riva-style names ("English-US.Female-1",
  see gateway/voice_aliases.py); empty takes the default voice.
- `language_code`: English only: empty, "en", or "en-" and a region ("en-US", "en-GB",
  BCP 47's two letters or three digits), in any case; anything else ("english",
  "enx", "fr-FR") is refused with INVALID_ARGUMENT naming these.
- `encoding`: LINEAR_PCM (raw s16le, as Riva sends it), FLAC, MULAW, ALAW, OGGOPUS.
- `sample_rate_hz`: the tts.v1 rates, checked alike for every encoding. Opus has no
  22.05 or 44.1 kHz mode, and Riva clients ask for 22050 by default, so OGGOPUS at
  those rates is encoded at 24 or 48 kHz, and at Opus's own 12 kHz at 16 kHz (Opus
  decoders output 48 kHz whatever the header says); any other rate that is not
  Opus's (1, -8000, 192000) is refused with the message every encoding gives.
- `custom_configuration`: tts.v1's sampling parameters ("max_tokens": "70", ...).
- `id`: echoed in every response; its value is the request id of logs and traces.
- `Synthesize` returns the whole audio in one response; `SynthesizeOnline` takes a
  stream of requests as the pinned client sends them (each message one text, settings
  from the first) and streams audio chunks as they are generated.
- Chorus's summary travels in trailing metadata: `chorus-summary-bin` (a serialized
  tts.v1 SynthesisSummary) and a few readable `chorus-*` keys.
- Zero-shot prompts (any `zero_shot_data`, with an audio prompt or not), custom
  dictionaries and word timings are refused with INVALID_ARGUMENT: the backbone has
  none of them, and silence about it would mislead.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import grpc

from chorus.proto.riva import riva_audio_pb2, riva_tts_pb2, riva_tts_pb2_grpc
from chorus.proto.tts.v1 import common_pb2, gateway_pb2
from chorus.speech.audio_formats import FORMATS
from chorus.telemetry import tracing
from gateway import validation, voice_aliases
from gateway.config import GatewayConfig
from gateway.encoding import Encoded, whole_file
from gateway.errors import GatewayError, abort_with, invalid
from gateway.feed import TextFeed
from gateway.pipeline import Pipeline
from gateway.sampling_fields import sampling_from_mapping
from gateway.segmenter import Segmenter
from gateway.synthesis import SynthesisOptions, synthesize

SERVICE_NAME = riva_tts_pb2.DESCRIPTOR.services_by_name["RivaSpeechSynthesis"].full_name

ENCODINGS = {
    riva_audio_pb2.ENCODING_UNSPECIFIED: "pcm",
    riva_audio_pb2.LINEAR_PCM: "pcm",
    riva_audio_pb2.FLAC: "flac",
    riva_audio_pb2.MULAW: "mulaw",
    riva_audio_pb2.ALAW: "alaw",
    riva_audio_pb2.OGGOPUS: "opus",
}
LANGUAGE = "en-US"
# "en" alone or with a BCP 47 region: two letters or three digits ("en-US", "en-419").
_ENGLISH = re.compile(r"en(-([a-z]{2}|[0-9]{3}))?", re.IGNORECASE)
# Rates Riva clients ask for that Opus cannot encode, and the Opus rate used instead.
_OPUS_RATE_FOR = {12000: 16000, 22050: 24000, 44100: 48000}


def summary_metadata(summary: common_pb2.SynthesisSummary) -> list[tuple[str, str | bytes]]:
    # Text metadata must be printable ASCII; a caller's id may not be (the -bin summary has it).
    readable_id = [("chorus-request-id", summary.request_id)] if _printable_ascii(summary.request_id) else []
    return [
        ("chorus-summary-bin", summary.SerializeToString()),
        *readable_id,
        ("chorus-trace-id", summary.trace_id),
        ("chorus-time-to-first-audio-ms", f"{summary.time_to_first_audio_ms:.1f}"),
        ("chorus-audio-seconds", f"{summary.audio_seconds:.3f}"),
        ("chorus-real-time-factor", f"{summary.real_time_factor:.3f}"),
    ]


def _printable_ascii(text: str) -> bool:
    return text.isascii() and text.isprintable()


class RivaSynthesisServicer(riva_tts_pb2_grpc.RivaSpeechSynthesisServicer):
    def __init__(self, config: GatewayConfig, pipeline: Pipeline) -> None:
        self._config = config
        self._pipeline = pipeline

    async def Synthesize(self, request, context: grpc.aio.ServicerContext):
        arrived = time.monotonic()
        try:
            validation.check_text(request.text, self._config)
            options = self._options(request, context.time_remaining())
            tracing.tag_request(options.spec.request_id, **{"chorus.text_chars": len(request.text)})
            feed = await TextFeed.of_text(request.text, self._segmenter())
            audio, samples = [], 0
            async with contextlib.aclosing(synthesize(self._pipeline, feed, options, arrived)) as items:
                async for item in items:
                    if isinstance(item, Encoded):
                        audio.append(item.data)
                        samples += item.num_samples
                    else:
                        context.set_trailing_metadata(summary_metadata(item))
            return riva_tts_pb2.SynthesizeSpeechResponse(
                # Sent whole, so a FLAC says its length (a streamed one cannot).
                audio=whole_file(options.format, b"".join(audio), samples), id=request.id,
                meta=riva_tts_pb2.SynthesizeSpeechResponseMetadata(text=request.text),
            )
        except GatewayError as err:
            await abort_with(context, err)

    async def SynthesizeOnline(self, request_iterator, context: grpc.aio.ServicerContext):
        arrived = time.monotonic()
        requests = request_iterator.__aiter__()
        reader = None
        try:
            first = await anext(requests, None)
            if first is None:
                raise invalid("the stream closed before its first request")
            options = self._options(first, context.time_remaining())
            tracing.tag_request(options.spec.request_id)
            feed = TextFeed(self._segmenter())
            reader = asyncio.create_task(self._read_texts(first, requests, feed))
            async with contextlib.aclosing(synthesize(self._pipeline, feed, options, arrived)) as items:
                async for item in items:
                    if isinstance(item, Encoded):
                        yield riva_tts_pb2.SynthesizeSpeechResponse(audio=item.data, id=first.id)
                    else:
                        context.set_trailing_metadata(summary_metadata(item))
        except GatewayError as err:
            await abort_with(context, err)
        finally:
            if reader is not None:
                reader.cancel()

    async def GetRivaSynthesisConfig(self, request, context):
        names = voice_aliases.riva_voice_names(self._config)
        subvoices = ",".join(f"{name.split('.', 1)[1]}:{i}" for i, (name, _) in enumerate(names))
        config = riva_tts_pb2.RivaSynthesisConfigResponse.Config(
            model_name=request.model_name or "chorus",
            parameters={
                "language_code": LANGUAGE,
                "voice_name": voice_aliases.RIVA_LANGUAGE,
                "subvoices": subvoices,
                "sample_rate_hz": "24000",
                # Chorus's own names, which voice_name also takes.
                "chorus_voices": ",".join(self._config.voices),
            },
        )
        return riva_tts_pb2.RivaSynthesisConfigResponse(model_config=[config])

    async def _read_texts(self, first, requests, feed: TextFeed) -> None:
        """Each request of SynthesizeOnline is one text (as the client sends a list), spoken whole."""
        try:
            message = first
            while message is not None:
                if message.text:
                    validation.check_text_piece(message.text, self._config)
                    await feed.push(message.text + " ")
                    await feed.flush()
                    validation.check_backlog(feed.waiting_chars, self._config)
                message = await anext(requests, None)
            await feed.end()
        except GatewayError as err:
            feed.fail(err)

    def _segmenter(self) -> Segmenter:
        return Segmenter(self._config.segment_target_chars)

    def _options(self, request: riva_tts_pb2.SynthesizeSpeechRequest, time_remaining) -> SynthesisOptions:
        language = request.language_code
        if language and not _ENGLISH.fullmatch(language):
            raise invalid(f"language_code {language!r} is not spoken here; this deployment speaks English: "
                          f"use {LANGUAGE} (or en, or en- and a region such as en-GB), or leave it empty")
        if request.HasField("zero_shot_data"):
            raise invalid("zero_shot_data is not supported (no voice cloning, with an audio prompt or without); "
                          "leave it unset and pick a voice_name")
        if request.custom_dictionary:
            raise invalid("custom_dictionary is not supported: the backbone reads text, not phonemes")
        if request.enable_word_time_offsets:
            raise invalid("enable_word_time_offsets is not supported: the backbone gives no word timings")
        fmt_name = ENCODINGS.get(request.encoding)
        if fmt_name is None:
            raise invalid(f"encoding {request.encoding} is not supported; use LINEAR_PCM, FLAC, MULAW, ALAW or OGGOPUS")
        rate = request.sample_rate_hz
        if fmt_name == "opus":
            rate = _OPUS_RATE_FOR.get(rate, rate)
        return validation.options(
            self._config,
            time_remaining,
            voice=voice_aliases.resolve(request.voice_name, self._config),
            audio=gateway_pb2.AudioConfig(encoding=FORMATS[fmt_name].wire, sample_rate_hz=rate),
            sampling=sampling_from_mapping(dict(request.custom_configuration), "custom_configuration"),
            request_id=request.id.value if request.HasField("id") else "",
        )
