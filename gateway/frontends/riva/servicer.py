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
- `zero_shot_data`: the prompt recording and its transcript clone a voice (a family
  that clones, NeuTTS-Air, must be served), registered the first time the prompt is
  seen and spoken instead of `voice_name` (riva/zero_shot.py).
- Custom dictionaries and word timings are refused with INVALID_ARGUMENT: the
  backbone has neither, and silence about it would mislead.

The request's mapping onto SynthesisOptions is `mapping.py`'s; what every door does
alike (reading the stream, statuses, tags) is `gateway.frontends.shell`'s.
"""

from __future__ import annotations

import time

import grpc

from chorus.proto.riva import riva_tts_pb2, riva_tts_pb2_grpc
from chorus.proto.tts.v1 import common_pb2
from gateway import validation, voice_aliases, voice_registration
from gateway.encoding import Encoded, whole_file
from gateway.feed import TextFeed
from gateway.frontends import shell
from gateway.frontends.riva import zero_shot
from gateway.frontends.riva.mapping import LANGUAGE, synthesis_options
from gateway.request_types import SynthesisOptions

SERVICE_NAME = riva_tts_pb2.DESCRIPTOR.services_by_name["RivaSpeechSynthesis"].full_name


def summary_metadata(summary: common_pb2.SynthesisSummary) -> list[tuple[str, str | bytes]]:
    # Text metadata must be printable ASCII; a caller's id may not be (the -bin summary has it).
    readable_id = [("chorus-request-id", summary.request_id)] if shell.printable_ascii(summary.request_id) else []
    return [
        ("chorus-summary-bin", summary.SerializeToString()),
        *readable_id,
        ("chorus-trace-id", summary.trace_id),
        ("chorus-time-to-first-audio-ms", f"{summary.time_to_first_audio_ms:.1f}"),
        ("chorus-audio-seconds", f"{summary.audio_seconds:.3f}"),
        ("chorus-real-time-factor", f"{summary.real_time_factor:.3f}"),
    ]


class RivaSynthesisServicer(shell.GrpcDoor, riva_tts_pb2_grpc.RivaSpeechSynthesisServicer):
    async def Synthesize(self, request, context: grpc.aio.ServicerContext):
        arrived = time.monotonic()
        async with shell.gateway_status(context):
            validation.check_text(request.text, self._config)
            options = await self._options(request, context)
            shell.tag(options, text_chars=len(request.text))
            feed = await shell.whole_text_feed(request.text, self._config)
            audio, samples = [], 0
            async with self._synthesis(feed, options, arrived) as items:
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

    async def SynthesizeOnline(self, request_iterator, context: grpc.aio.ServicerContext):
        arrived = time.monotonic()
        # Each request is one text, the first (which carries the settings) included.
        async with shell.gateway_status(context), shell.streamed_text(
            request_iterator, self._config, "the synthesis settings",
            lambda first: self._options(first, context), self._take,
            first_has_text=True,
        ) as (first, options, feed):
            async with self._synthesis(feed, options, arrived) as items:
                async for item in items:
                    if isinstance(item, Encoded):
                        yield riva_tts_pb2.SynthesizeSpeechResponse(audio=item.data, id=first.id)
                    else:
                        context.set_trailing_metadata(summary_metadata(item))

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

    async def _options(self, request: riva_tts_pb2.SynthesizeSpeechRequest,
                       context: grpc.aio.ServicerContext) -> SynthesisOptions:
        """The request's options; a zero-shot prompt is registered (once) and spoken."""
        voice = ""
        if request.HasField("zero_shot_data"):
            voice = await zero_shot.voice_of(
                self._config, self._pipeline.router, request.zero_shot_data,
                request.id.value if request.HasField("id") else "",
                voice_registration.deadline_of(self._config, context.time_remaining()),
            )
        return synthesis_options(request, self._config, context.time_remaining(), cloned_voice=voice)

    async def _take(self, request: riva_tts_pb2.SynthesizeSpeechRequest, feed: TextFeed) -> bool:
        """One request of SynthesizeOnline: one text (as the client sends a list), spoken whole."""
        if request.text:
            await shell.push_text(feed, request.text, self._config, whole=True)
        return True

