"""Sampling parameters from Riva's string map and the OpenAI endpoint's JSON object
(gateway/sampling_fields.py), without a server: each accepted spelling becomes the
tts.v1 field, and each refused one names the field and what it must be."""

from __future__ import annotations

import grpc
import pytest

from gateway.errors import GatewayError
from gateway.sampling_fields import FIELDS, sampling_from_mapping


@pytest.mark.parametrize(
    "values, field, expected",
    [
        ({"temperature": "0.5"}, "temperature", 0.5),
        ({"temperature": 0.25}, "temperature", 0.25),
        ({"top_p": " 0.9 "}, "top_p", pytest.approx(0.9)),
        ({"top_k": "40"}, "top_k", 40),
        ({"top_k": 40.0}, "top_k", 40),  # a JSON number that is whole
        ({"max_tokens": "70"}, "max_tokens", 70),
        ({"seed": str(2**64 - 1)}, "seed", 2**64 - 1),  # seeds take the whole uint64
        ({"ignore_end_of_speech": "TRUE"}, "ignore_end_of_speech", True),
        ({"ignore_end_of_speech": False}, "ignore_end_of_speech", False),
        ({"repetition_penalty": "1.1"}, "repetition_penalty", pytest.approx(1.1)),
    ],
)
def test_accepted_spellings_become_the_tts_v1_field(values, field, expected):
    params = sampling_from_mapping(values, "custom_configuration")
    assert getattr(params, field) == expected


def test_an_empty_map_sets_nothing():
    assert sampling_from_mapping({}, "sampling") is None


@pytest.mark.parametrize(
    "values, says",
    [
        ({"temprature": "0.5"}, "unknown key 'temprature'"),
        ({"top_k": "1.5"}, "custom_configuration.top_k is '1.5'; it must be a whole number"),
        ({"top_k": str(2**31)}, "a whole number"),  # past int32 for everything but the seed
        ({"seed": str(2**64)}, "a whole number"),
        ({"seed": "-1"}, "a whole number"),
        ({"temperature": "nan"}, "a finite number"),
        ({"temperature": "inf"}, "a finite number"),
        ({"temperature": True}, "a finite number"),  # a JSON boolean is not a number
        ({"ignore_end_of_speech": "yes"}, "true or false"),
        ({"max_tokens": None}, "a whole number"),
    ],
)
def test_refused_values_name_the_field_and_what_it_must_be(values, says):
    with pytest.raises(GatewayError) as caught:
        sampling_from_mapping(values, "custom_configuration")
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert says in caught.value.message


def test_an_unknown_key_lists_the_keys_there_are():
    with pytest.raises(GatewayError) as caught:
        sampling_from_mapping({"topp": 0.9}, "sampling")
    assert all(name in caught.value.message for name in FIELDS)
    assert caught.value.message.startswith("sampling: ")
