"""Sampling parameters from the loosely typed maps of other APIs.

Riva's `custom_configuration` is a map of strings ("max_tokens": "70"), the OpenAI
endpoint's `sampling` extension a JSON object: both become the same SamplingParams
that tts.v1 takes, and then pass the same range checks. A key that is not a sampling
parameter is refused, not ignored: a typo must not silently change nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from chorus.proto.tts.v1 import common_pb2
from gateway.errors import invalid

_INTEGERS = {"top_k", "max_tokens", "seed"}
_FLOATS = {"temperature", "top_p", "min_p", "repetition_penalty"}
_BOOLEANS = {"ignore_end_of_speech"}
FIELDS = tuple(sorted(_INTEGERS | _FLOATS | _BOOLEANS))


def sampling_from_mapping(values: Mapping[str, object], where: str) -> common_pb2.SamplingParams | None:
    """SamplingParams from `values` (strings or JSON scalars); None when empty. `where`
    names the field in errors ("custom_configuration", "sampling")."""
    if not values:
        return None
    params = common_pb2.SamplingParams()
    for key, raw in values.items():
        if key not in FIELDS:
            raise invalid(f"{where}: unknown key {key!r}; the sampling keys are {', '.join(FIELDS)}")
        setattr(params, key, _parse(key, raw, where))
    return params


def _parse(key: str, raw: object, where: str):
    text = raw.strip() if isinstance(raw, str) else raw
    try:
        if key in _BOOLEANS:
            if isinstance(text, bool):
                return text
            if isinstance(text, str) and text.lower() in ("true", "false"):
                return text.lower() == "true"
            raise ValueError
        if isinstance(text, bool):
            raise ValueError
        if key in _INTEGERS:
            if isinstance(text, float) and not text.is_integer():
                raise ValueError
            value = int(text)
            if not 0 <= value < 2**64 or (key != "seed" and value >= 2**31):
                raise ValueError
            return value
        value = float(text)
        if not math.isfinite(value):
            raise ValueError
        return value
    except (TypeError, ValueError, OverflowError):
        kind = "true or false" if key in _BOOLEANS else "a whole number" if key in _INTEGERS else "a finite number"
        raise invalid(f"{where}.{key} is {raw!r}; it must be {kind}") from None
