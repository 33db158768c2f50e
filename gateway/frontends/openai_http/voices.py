"""`POST /v1/audio/voices` (clone a voice) and `DELETE /v1/audio/voices/{name}`.

The body is JSON, as every body this port reads: `{"name", "transcript", "audio"
(the recording's file, base64), "family" (optional)}`. A multipart form would be
handier for curl, but it is a body any web page can make a visitor's browser send
without a preflight, and registering stores data and spends encoder time; JSON
needs a preflight, which CORS then governs. The logic is the tts.v1 door's
(gateway/voice_registration.py), so every rule and message is the same.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import voice_registration
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, invalid
from gateway.frontends.openai_http.access import OUTCOME
from gateway.frontends.openai_http.body import json_body
from gateway.frontends.openai_http.errors import error_response
from gateway.pipeline import Pipeline


class VoiceEndpoints:
    def __init__(self, config: GatewayConfig, pipeline: Pipeline) -> None:
        self._config = config
        self._pipeline = pipeline

    async def register(self, request: Request) -> Response:
        body = await json_body(request, self._config.http_read_timeout_s,
                               '{"name": ..., "transcript": ..., "audio": "<the recording file, base64>"}')
        if isinstance(body, Response):
            return body
        try:
            if not isinstance(body, dict):
                raise invalid("the body must be a JSON object with `name`, `transcript` and `audio`")
            name, transcript, family = _text(body, "name"), _text(body, "transcript"), _text(body, "family", False)
            audio = await asyncio.to_thread(_audio, body)  # megabytes of base64, off the event loop
            registered = await voice_registration.register_voice(
                self._config, self._pipeline.router, name, transcript, audio, family, uuid.uuid4().hex,
                voice_registration.deadline_of(self._config, None),
            )
        except GatewayError as err:
            request.state[OUTCOME] = err.code
            return error_response(err)
        return JSONResponse({
            "id": registered.name, "name": registered.name, "description": registered.description,
            "reference_seconds": round(registered.reference_seconds, 3), "reference_frames": registered.frames,
        }, status_code=201)

    async def delete(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            await voice_registration.delete_voice(self._config, name)
        except GatewayError as err:
            request.state[OUTCOME] = err.code
            return error_response(err)
        return JSONResponse({"id": name, "deleted": True})


def _text(body: dict, field: str, required: bool = True) -> str:
    value = body.get(field)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise invalid(f"`{field}` is required, as a string" if required else f"`{field}` must be a string")
    return value


def _audio(body: dict) -> bytes:
    value = body.get("audio")
    if not isinstance(value, str) or not value:
        raise invalid("`audio` is required: the reference recording's file (WAV, FLAC, MP3, Ogg), base64-encoded")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("`audio` is not valid base64 (standard alphabet, padded)") from None
