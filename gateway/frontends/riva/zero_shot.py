"""Riva's zero-shot prompt (`zero_shot_data`) as a cloned voice.

Riva sends the prompt recording and its transcript with every request, where Chorus
clones a voice once and names it; so the prompt is registered the first time it is
seen, under a name made from the recording and transcript, and every request that
carries it again speaks that voice without encoding anything. `nvidia-riva-client`
sends the prompt file's bytes as they are (a WAV with its header); a prompt of bare
16-bit PCM, which LINEAR_PCM with `sample_rate_hz` describes, is given a WAV header
so that both read alike. `quality` (Riva's sampling steps for its own zero-shot
model) has no counterpart in a codec-language model and is ignored.
"""

from __future__ import annotations

import asyncio
import io
import wave

from chorus.proto.riva import riva_audio_pb2, riva_tts_pb2
from gateway import voice_registration
from gateway.config import GatewayConfig
from gateway.errors import invalid
from gateway.router import Router

# What container formats open with; anything else under LINEAR_PCM is bare samples.
_CONTAINER_MAGIC = (b"RIFF", b"fLaC", b"OggS", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"FORM")


def prompt_audio(data: riva_tts_pb2.ZeroShotData) -> bytes:
    """The prompt as a file FFmpeg opens."""
    audio = data.audio_prompt
    if not audio:
        raise invalid("zero_shot_data.audio_prompt is empty: send 1-30 s of the voice to clone, with its "
                      "transcript in zero_shot_data.transcript")
    if data.encoding in (riva_audio_pb2.LINEAR_PCM, riva_audio_pb2.ENCODING_UNSPECIFIED) \
            and not audio.startswith(_CONTAINER_MAGIC):
        if data.sample_rate_hz <= 0:
            raise invalid("zero_shot_data.audio_prompt is bare PCM, so zero_shot_data.sample_rate_hz must say "
                          "its rate (or send the WAV file whole)")
        if len(audio) % 2:
            raise invalid("zero_shot_data.audio_prompt is bare 16-bit PCM of an odd number of bytes")
        wrapped = io.BytesIO()
        with wave.open(wrapped, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(data.sample_rate_hz)
            out.writeframes(audio)
        return wrapped.getvalue()
    return audio


async def voice_of(
    config: GatewayConfig, router: Router, data: riva_tts_pb2.ZeroShotData, request_id: str, deadline: float
) -> str:
    """The cloned voice a request's zero-shot prompt speaks with."""
    if not data.transcript.strip():
        raise invalid("zero_shot_data.transcript is empty: the words spoken in the audio prompt are needed to "
                      "clone its voice")
    audio = await asyncio.to_thread(prompt_audio, data)  # a WAV header around megabytes of PCM: a copy
    return await voice_registration.zero_shot_voice(config, router, audio, data.transcript, request_id, deadline)
