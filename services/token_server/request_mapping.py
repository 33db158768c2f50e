"""From a tts.v1 GenerateRequest to the GenerationRequest the engine runs.

Kept apart from the servicer so that the servicer only adapts gRPC (status codes,
streams) and every rule about what a request may ask for is testable without a server
or a model: InvalidRequest carries the message the caller sees, naming the field.
What fits a slot is not decided here: the engine is the authority (Engine.submit
refuses with PromptTooLongError), and the budget is only capped at the room it reports.
"""

from __future__ import annotations

import uuid
from typing import Callable

from chorus.proto.tts.v1 import common_pb2, token_server_pb2
from chorus.realtime.playback import PlaybackClock
from chorus.speech import orpheus
from chorus.speech.family import SpeechFamily
from services.token_server.prompts import PromptError, Prompts
from services.token_server.request import GenerationRequest
from services.token_server.sampler import SamplingParams

MAX_TEXT_CHARS = 20_000
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


class InvalidRequest(ValueError):
    """A request the engine must not see; the message says which field and why."""


def resolve_sampling(request: common_pb2.SamplingParams, family: SpeechFamily = orpheus.FAMILY) -> SamplingParams:
    """Proto sampling fields (each optional) over the family's defaults, a random seed
    if none; ValueError naming the field on a bad value."""
    defaults = SamplingParams(**dict(family.sampling_defaults))
    values = {name: getattr(request if request.HasField(name) else defaults, name) for name in SAMPLING_FIELDS}
    if not request.HasField("seed"):
        values["seed"] = uuid.uuid4().int & (2**63 - 1)
    return SamplingParams(**values)


def check_replay(
    request: token_server_pb2.GenerateRequest, token_budget: int, family: SpeechFamily = orpheus.FAMILY
) -> None:
    """resume_from_sample and verify_frames: within what the request can generate."""
    if not (request.resume_from_sample or request.verify_frames):
        return
    if request.codes_only:
        raise InvalidRequest("resume_from_sample and verify_frames replay audio; codes_only has none")
    frames = token_budget // family.codes_per_frame
    if not 0 <= request.resume_from_sample <= frames * family.samples_per_frame:
        raise InvalidRequest(
            f"resume_from_sample {request.resume_from_sample} is outside 0..{frames * family.samples_per_frame}, "
            f"the audio of this request's {frames} frames at most"
        )
    if not 0 <= request.verify_frames <= frames:
        raise InvalidRequest(f"verify_frames {request.verify_frames} is outside 0..{frames}, this request's frames at most")


def token_budget(
    sampling: common_pb2.SamplingParams, text: str, room: int, headroom: float, family: SpeechFamily = orpheus.FAMILY
) -> int:
    """Tokens to generate: sampling.max_tokens or a budget from the text, no more than
    `room` (what a slot leaves after the prompt), in whole frames. With less than a
    frame of room it is one frame, which the engine refuses as too long: the refusal
    and its message are the engine's."""
    requested = sampling.max_tokens if sampling.HasField("max_tokens") else 0
    per_frame = family.codes_per_frame
    budget = min(requested or family.default_max_tokens(text, headroom), max(room, per_frame))
    budget -= budget % per_frame
    if budget < per_frame:
        raise InvalidRequest(
            f"sampling.max_tokens is {requested}; it must be 0 (a budget from the text) or at least "
            f"{per_frame} (one frame of audio)"
        )
    return budget


def to_generation_request(
    request: token_server_pb2.GenerateRequest, request_id: str, now: float,
    prompts: Prompts, budget_headroom: float, token_room: Callable[[int], int],
) -> GenerationRequest:
    """The engine's request; InvalidRequest on anything the caller must change.
    `token_room` is Engine.token_room: tokens a slot leaves after a prompt. With a
    blocking `prompts` (Prompts.blocking), call it off the event loop."""
    family = prompts.family
    text = request.text.strip()
    if not text:
        raise InvalidRequest("text is empty: send the words to speak")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidRequest(f"text has {len(text)} characters, more than {MAX_TEXT_CHARS}; split it (the gateway does)")
    try:
        sampling = resolve_sampling(request.sampling, family)
        clock = PlaybackClock.from_wire(request.playback, family.sample_rate, now, max(0, request.resume_from_sample))
    except ValueError as err:
        raise InvalidRequest(f"bad request: {err}") from err
    fixed_length = request.sampling.ignore_end_of_speech
    if fixed_length and not request.sampling.max_tokens:
        raise InvalidRequest(
            "sampling.ignore_end_of_speech needs sampling.max_tokens: it generates exactly that many tokens"
        )
    try:
        prompt = prompts.build(text, request.voice)
    except PromptError as err:
        raise InvalidRequest(str(err)) from None
    budget = token_budget(request.sampling, text, token_room(len(prompt)), budget_headroom, family)
    check_replay(request, budget, family)
    return GenerationRequest(
        request_id, prompt, sampling, budget,
        ignore_end_of_speech=fixed_length, playback=clock, needs_codec=not request.codes_only,
    )
