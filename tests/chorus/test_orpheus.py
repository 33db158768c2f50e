"""The Orpheus protocol module: ids, prompt layout, code -> token, frame layout."""

from __future__ import annotations

import numpy as np
import pytest

from chorus.speech import orpheus


def test_vocabulary_layout():
    assert orpheus.VOCAB_SIZE == 156_940
    assert orpheus.custom_token_id(0) == 128_256
    assert orpheus.custom_token_id(10) == orpheus.AUDIO_TOKEN_BASE
    assert orpheus.custom_token_id(orpheus.N_CUSTOM_TOKENS - 1) == orpheus.VOCAB_SIZE - 1
    with pytest.raises(ValueError):
        orpheus.custom_token_id(orpheus.N_CUSTOM_TOKENS)
    # The special ids of the brief are custom tokens 1..6.
    assert [orpheus.custom_token_id(n) for n in range(1, 7)] == [
        orpheus.START_OF_SPEECH, orpheus.END_OF_SPEECH, orpheus.START_OF_HUMAN,
        orpheus.END_OF_HUMAN, orpheus.START_OF_AI, orpheus.END_OF_AI,
    ]
    # The last audio token of position 6 is the last token of the vocabulary... or below it.
    assert orpheus.audio_token_id(4095, 6) < orpheus.VOCAB_SIZE


def test_prompt_layout():
    text_ids = [orpheus.BOS, 1, 2, 3]
    assert orpheus.wrap_prompt(text_ids) == [128259, 128000, 1, 2, 3, 128009, 128260, 128261, 128257]
    assert orpheus.prompt_text("Hello", "tara") == "tara: Hello"
    assert orpheus.prompt_text("Hello", None) == "Hello"


@pytest.mark.parametrize("position", range(7))
@pytest.mark.parametrize("code", [0, 1, 2047, 4095])
def test_audio_token_id_every_position(position, code):
    token = orpheus.audio_token_id(code, position)
    assert token == 128266 + position * 4096 + code
    first, end = orpheus.audio_token_range(position)
    assert first <= token < end and token - first == code


def test_illegal_codes_and_positions_are_rejected():
    with pytest.raises(ValueError, match="code 4096"):
        orpheus.audio_token_id(4096, 0)
    with pytest.raises(ValueError, match="frame position 7"):
        orpheus.audio_token_id(0, 7)
    with pytest.raises(ValueError):
        orpheus.audio_token_range(-1)


def test_frames_to_layers():
    frames = np.array([[10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24, 25, 26]])
    l0, l1, l2 = orpheus.frames_to_layers(frames.ravel())
    assert l0.tolist() == [10, 20]
    assert l1.tolist() == [11, 14, 21, 24]
    assert l2.tolist() == [12, 13, 15, 16, 22, 23, 25, 26]


def test_validate_frames_names_the_bad_frame():
    good = list(range(7)) * 3
    assert orpheus.validate_frames(good, 5).shape == (3, 7)
    assert orpheus.validate_frames([0] * 7).tolist() == [[0] * 7]  # code 0 is valid
    with pytest.raises(ValueError, match="frame 12: code 4096"):
        orpheus.validate_frames([1] * 7 + [4096] + [1] * 6, first_frame_index=11)
    with pytest.raises(ValueError, match="frame 3: code -1"):
        orpheus.validate_frames([-1] + [0] * 6, first_frame_index=3)
    with pytest.raises(ValueError, match="multiple of 7"):
        orpheus.validate_frames([0] * 8)


def test_default_budget_is_whole_frames_and_grows_with_text():
    short, long = orpheus.default_max_tokens("Hi."), orpheus.default_max_tokens("word " * 200)
    assert short % 7 == 0 and long % 7 == 0
    assert long > short >= 7
    # Enough for speech at ~14 characters a second.
    text = "x" * 140
    assert orpheus.default_max_tokens(text) >= 10 * orpheus.TOKENS_PER_AUDIO_SECOND
