"""tts.v1.SynthesisService: Chorus's own door, adapting its calls to the synthesis logic.

Requests become SynthesisOptions (validation), text becomes a TextFeed, and what
`synthesize` yields becomes response messages; a GatewayError raised anywhere becomes
the call's status. Nothing else is decided here.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc

from chorus.proto.tts.v1 import gateway_pb2, gateway_pb2_grpc
from chorus.speech.audio_formats import FORMATS, NATIVE_RATE, SAMPLE_RATES
from gateway import validation, voice_registration
from gateway.encoding import Encoded
from gateway.errors import invalid
from gateway.feed import TextFeed
from gateway.frontends import shell
from gateway.request_types import SynthesisOptions

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["SynthesisService"].full_name


class SynthesisServicer(shell.GrpcDoor, gateway_pb2_grpc.SynthesisServiceServicer):
    async def Synthesize(self, request, context: grpc.aio.ServicerContext):
        arrived = time.monotonic()
        async with shell.gateway_status(context):
            options = validation.synthesize_options(request, self._config, context.time_remaining())
            shell.tag(options, text_chars=len(request.text))
            feed = await shell.whole_text_feed(request.text, self._config)
            async for item in self._run(feed, options, arrived, gateway_pb2.SynthesizeResponse):
                yield item

    async def StreamingSynthesize(self, request_iterator, context: grpc.aio.ServicerContext):
        arrived = time.monotonic()
        async with shell.gateway_status(context), shell.streamed_text(
            request_iterator, self._config, "`config`",
            lambda first: validation.streaming_options(first, self._config, context.time_remaining()), self._take,
        ) as (_, options, feed):
            async for item in self._run(feed, options, arrived, gateway_pb2.StreamingSynthesizeResponse):
                yield item

    async def ListVoices(self, request, context):
        # A description file per registered voice (up to --max-voices): read off the event loop.
        listed = await asyncio.to_thread(self._config.listed_voices)
        return gateway_pb2.ListVoicesResponse(voices=[gateway_pb2.Voice(name=n, description=d) for n, d in listed])

    async def RegisterVoice(self, request, context: grpc.aio.ServicerContext):
        async with shell.gateway_status(context):
            registered = await voice_registration.register_voice(
                self._config, self._pipeline.router, request.name, request.transcript, request.audio,
                request.family, uuid.uuid4().hex,
                voice_registration.deadline_of(self._config, context.time_remaining()),
            )
            return gateway_pb2.RegisterVoiceResponse(
                voice=gateway_pb2.Voice(name=registered.name, description=registered.description),
                reference_seconds=registered.reference_seconds, reference_frames=registered.frames,
            )

    async def DeleteVoice(self, request, context: grpc.aio.ServicerContext):
        async with shell.gateway_status(context):
            await voice_registration.delete_voice(self._config, request.name)
            return gateway_pb2.DeleteVoiceResponse()

    async def GetLimits(self, request, context):
        return gateway_pb2.GetLimitsResponse(
            max_text_chars=self._config.max_text_chars,
            encodings=[f.wire for f in FORMATS.values()],
            sample_rates_hz=list(SAMPLE_RATES),
            native_sample_rate_hz=NATIVE_RATE,
        )

    async def _run(self, feed: TextFeed, options: SynthesisOptions, arrived: float, response_type):
        async with self._synthesis(feed, options, arrived) as items:
            async for item in items:
                if isinstance(item, Encoded):
                    yield response_type(audio=gateway_pb2.AudioChunk(data=item.data, num_samples=item.num_samples))
                else:
                    yield response_type(summary=item)

    async def _take(self, message: gateway_pb2.StreamingSynthesizeRequest, feed: TextFeed) -> bool:
        """One message after `config`: text, a flush, or the end (False)."""
        kind = message.WhichOneof("payload")
        if kind == "text":
            await shell.push_text(feed, message.text, self._config)
        elif kind == "flush":
            await feed.flush()
        elif kind == "end":
            return False
        elif kind == "config":
            raise invalid("`config` may only be sent once, as the first message")
        else:
            raise invalid("empty StreamingSynthesize message: set one of text, flush or end")
        return True
