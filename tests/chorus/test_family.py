"""SpeechFamily: the facts the token server takes from a model family."""

from __future__ import annotations

import pytest

from chorus.speech import orpheus
from chorus.speech.family import SpeechFamily


def family(**changes) -> SpeechFamily:
    fields = dict(name="toy", codec="toy_codec", codes_per_frame=2, codebook_size=10, sample_rate=16_000,
                  samples_per_frame=320, code_token_base=100, end_of_speech=99, decoder_lookahead_frames=1,
                  tokens_per_char=3.0, minimum_budget=20)
    return SpeechFamily(**{**fields, **changes})


def test_codes_of_each_position_are_consecutive_tokens_after_the_base():
    toy = family()
    assert toy.code_token_range(0) == (100, 110) and toy.code_token_range(1) == (110, 120)
    assert toy.code_token_id(9, 1) == 119
    assert toy.eos_column == 10
    assert toy.tokens_per_audio_second == 100.0  # 2 codes a 20 ms frame
    for position in (-1, 2):
        with pytest.raises(ValueError, match="frame position"):
            toy.code_token_range(position)
    with pytest.raises(ValueError, match="code 10 outside 0..9"):
        toy.code_token_id(10, 0)


@pytest.mark.parametrize("end_of_speech", [100, 110, 119])
def test_end_of_speech_inside_the_code_tokens_is_refused(end_of_speech):
    with pytest.raises(ValueError, match="end of speech"):
        family(end_of_speech=end_of_speech)
    assert family(end_of_speech=120).end_of_speech == 120


def test_a_budget_from_the_text_is_whole_frames_and_at_least_the_minimum():
    toy = family()
    assert toy.default_max_tokens("", 1.5) == 200  # two seconds at 100 tokens a second
    assert toy.default_max_tokens("x" * 101, 1.0) == 502  # 303 + 200, cut to whole frames
    assert family(minimum_budget=301).default_max_tokens("", 1.0) == 300


@pytest.mark.parametrize("text", ["", "Hi.", "word " * 200, "x" * 7919])
@pytest.mark.parametrize("headroom", [1.0, 1.5, 3.7])
def test_orpheus_budgets_are_what_they_were_before_families(text, headroom):
    """The budget rule Orpheus had before SpeechFamily, restated: the same numbers."""
    before = max(7 * 24, int(len(text) * 6 * headroom) + 2 * 82)
    assert orpheus.default_max_tokens(text, headroom) == before - before % 7
    assert orpheus.FAMILY.code_token_range(6) == (orpheus.AUDIO_TOKEN_BASE + 6 * 4096, orpheus.AUDIO_TOKEN_BASE + 7 * 4096)
