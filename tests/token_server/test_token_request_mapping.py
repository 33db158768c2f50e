"""From a GenerateRequest to the engine's request, with no server and no model:
sampling over its defaults and limits, the budget, the replay fields."""

from __future__ import annotations

import pytest

from chorus.proto.tts.v1 import common_pb2, token_server_pb2
from chorus.speech import orpheus
from services.token_server.prompts import OrpheusPrompts
from services.token_server.request_mapping import (
    InvalidRequest,
    check_replay,
    resolve_sampling,
    to_generation_request,
)
from services.token_server.sampler import SamplingParams

VOICES = ("tara", "leo")


def mapped(request: token_server_pb2.GenerateRequest, room: int = 1000):
    return to_generation_request(request, "r1", 100.0, OrpheusPrompts(VOICES, lambda text: [orpheus.BOS, 1, 2]), 1.5,
                                 token_room=lambda prompt_tokens: room)


def test_unset_sampling_fields_take_the_defaults_and_a_random_seed():
    resolved = resolve_sampling(common_pb2.SamplingParams(top_k=40))
    defaults = SamplingParams()
    assert resolved.top_k == 40
    assert (resolved.temperature, resolved.top_p, resolved.min_p, resolved.repetition_penalty) == (
        defaults.temperature, defaults.top_p, defaults.min_p, defaults.repetition_penalty)
    assert resolve_sampling(common_pb2.SamplingParams()).seed != resolve_sampling(common_pb2.SamplingParams()).seed
    assert resolve_sampling(common_pb2.SamplingParams(seed=7)).seed == 7


@pytest.mark.parametrize("sampling, field", [
    (common_pb2.SamplingParams(temperature=5), "temperature"),
    (common_pb2.SamplingParams(top_p=0), "top_p"),
    (common_pb2.SamplingParams(min_p=2), "min_p"),
    (common_pb2.SamplingParams(temperature=float("nan")), "temperature is nan"),
])
def test_out_of_range_sampling_is_refused_naming_the_field(sampling, field):
    with pytest.raises(ValueError, match=field):
        resolve_sampling(sampling)
    with pytest.raises(InvalidRequest, match=f"bad request: .*{field}"):
        mapped(token_server_pb2.GenerateRequest(text="hi", sampling=sampling))


def test_the_budget_is_whole_frames_within_the_slot_and_one_frame_when_nothing_fits():
    request = token_server_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(max_tokens=100))
    assert mapped(request).token_budget == 98
    assert mapped(request, room=50).token_budget == 49
    # No room for a frame: the engine refuses it as too long (Engine.submit), not this.
    assert mapped(request, room=3).token_budget == orpheus.CODES_PER_FRAME
    with pytest.raises(InvalidRequest, match="sampling.max_tokens is 3"):
        mapped(token_server_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(max_tokens=3)))


def test_the_request_carries_prompt_voice_clock_and_codec_need():
    generation = mapped(token_server_pb2.GenerateRequest(
        text=" hi ", voice="leo", codes_only=True,
        playback=common_pb2.PlaybackClock(first_sample_due_in_s=2.0)))
    assert generation.prompt == orpheus.wrap_prompt([orpheus.BOS, 1, 2])
    assert not generation.needs_codec
    assert generation.playback.due_at(0) == pytest.approx(102.0)
    with pytest.raises(InvalidRequest, match="unknown voice"):
        mapped(token_server_pb2.GenerateRequest(text="hi", voice="nobody"))
    with pytest.raises(InvalidRequest, match="text is empty"):
        mapped(token_server_pb2.GenerateRequest(text="  "))
    with pytest.raises(InvalidRequest, match="playback.start_buffer_s"):
        mapped(token_server_pb2.GenerateRequest(text="hi", playback=common_pb2.PlaybackClock(start_buffer_s=99)))


@pytest.mark.parametrize("fields, message", [
    (dict(codes_only=True, verify_frames=1), "codes_only has none"),
    (dict(resume_from_sample=10 * orpheus.SAMPLES_PER_FRAME + 1), "resume_from_sample 20481 is outside 0..20480"),
    (dict(resume_from_sample=-1), "resume_from_sample -1 is outside"),
    (dict(verify_frames=11), "verify_frames 11 is outside 0..10"),
])
def test_replay_fields_outside_what_the_request_generates_are_refused(fields, message):
    with pytest.raises(InvalidRequest, match=message):
        check_replay(token_server_pb2.GenerateRequest(text="hi", **fields), 10 * orpheus.CODES_PER_FRAME)


def test_replay_fields_within_the_budget_pass():
    check_replay(token_server_pb2.GenerateRequest(text="hi", resume_from_sample=20480, verify_frames=10), 70)
    request = token_server_pb2.GenerateRequest(
        text="hi", resume_from_sample=2048, sampling=common_pb2.SamplingParams(max_tokens=14))
    assert mapped(request).token_budget == 14  # resuming at frame 1 of 2: within it
    with pytest.raises(InvalidRequest, match="verify_frames 3 is outside 0..2"):
        mapped(token_server_pb2.GenerateRequest(text="hi", verify_frames=3,
                                                sampling=common_pb2.SamplingParams(max_tokens=14)))
