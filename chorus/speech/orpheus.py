"""The Orpheus TTS protocol: vocabulary layout, prompt format, and how audio tokens
become SNAC codes.

The serving code reaches token ids and code frames only through here (the token
server's sampler reads the legal columns of a position with `audio_token_range`, its
scheduler turns a sampled code into the next input with `audio_token_id`), so the
facts live in one place.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from chorus.speech import codecs
from chorus.speech import family
from chorus.speech.family import SpeechFamily

# Vocabulary: 128,256 Llama-3 tokens, then 28,684 `<custom_token_N>` at 128256 + N.
TEXT_VOCAB_SIZE = 128_256
CUSTOM_TOKEN_BASE = 128_256
N_CUSTOM_TOKENS = 28_684
VOCAB_SIZE = TEXT_VOCAB_SIZE + N_CUSTOM_TOKENS  # 156,940



def custom_token_id(n: int) -> int:
    """Id of `<custom_token_n>`."""
    if not 0 <= n < N_CUSTOM_TOKENS:
        raise ValueError(f"custom token index {n} outside 0..{N_CUSTOM_TOKENS - 1}")
    return CUSTOM_TOKEN_BASE + n


BOS = 128_000
END_OF_TEXT = 128_009
START_OF_SPEECH = custom_token_id(1)  # 128_257
END_OF_SPEECH = custom_token_id(2)
START_OF_HUMAN = custom_token_id(3)
END_OF_HUMAN = custom_token_id(4)
START_OF_AI = custom_token_id(5)
END_OF_AI = custom_token_id(6)
AUDIO_TOKEN_BASE = custom_token_id(10)  # 128_266: 7 x 4096 audio tokens from here

# SNAC 24 kHz: one frame is 7 codes (1 + 2 + 4 over three layers) and 2048 samples.
CODEC = codecs.SNAC_24KHZ  # what the token server's streams ask codec workers for
CODES_PER_FRAME = 7
CODEBOOK_SIZE = 4096
SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = 2048
FRAME_SECONDS = SAMPLES_PER_FRAME / SAMPLE_RATE  # 85.33 ms
TOKENS_PER_AUDIO_SECOND = CODES_PER_FRAME / FRAME_SECONDS  # ~82

# SNAC's decoder reaches 4,757 samples (2.32 frames) to each side, so its first
# samples need 3 frames: the backbone's "first decodable frames".
DECODER_LOOKAHEAD_FRAMES = 3

# Position in the frame of each code, by layer: layer 0 [t0], layer 1 [t1, t4],
# layer 2 [t2, t3, t5, t6].
LAYER_POSITIONS = ((0,), (1, 4), (2, 3, 5, 6))

DEFAULT_VOICE = "tara"


def prompt_text(text: str, voice: str | None) -> str:
    """The text the backbone reads: "{voice}: {text}"."""
    return f"{voice}: {text}" if voice else text


def wrap_prompt(text_ids: Sequence[int]) -> list[int]:
    """Frames tokenized text (BOS first) in the Orpheus turn markers."""
    return [START_OF_HUMAN, *text_ids, END_OF_TEXT, END_OF_HUMAN, START_OF_AI, START_OF_SPEECH]


def audio_token_range(position: int) -> tuple[int, int]:
    """[first, last+1) token ids that are legal at `position` (0..6) of a frame."""
    return FAMILY.code_token_range(position)


def audio_token_id(code: int, position: int) -> int:
    """Token id that carries `code` at `position` of a frame."""
    return FAMILY.code_token_id(code, position)


def frames_to_layers(codes: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits n frames (7n codes, flat or (n, 7)) into SNAC's three layers.

    Returns int64 arrays of shape (n,), (2n,), (4n,), in time order per layer.
    """
    frames = np.asarray(codes, dtype=np.int64).reshape(-1, CODES_PER_FRAME)
    return tuple(frames[:, list(pos)].reshape(-1) for pos in LAYER_POSITIONS)  # type: ignore[return-value]


def validate_frames(codes: Sequence[int], first_frame_index: int = 0) -> np.ndarray:
    """Checks a flat run of codes and returns it as (n, 7) int64.

    Raises ValueError naming the first bad frame, so that callers can report it.
    """
    return codecs.check_frames(codes, first_frame_index, CODES_PER_FRAME, CODEBOOK_SIZE)


# How much longer than the text's expected speech a generation may run before it is
# stopped (see default_max_tokens).
DEFAULT_BUDGET_HEADROOM = 1.5


# Speech runs at roughly 14 characters a second and ~82 tokens a second, so about 6
# tokens a character; a budget from the text allows `headroom` times that, plus two
# seconds, and at least 24 frames.
FAMILY = SpeechFamily(
    name=family.ORPHEUS, codec=CODEC, codes_per_frame=CODES_PER_FRAME, codebook_size=CODEBOOK_SIZE,
    sample_rate=SAMPLE_RATE, samples_per_frame=SAMPLES_PER_FRAME, code_token_base=AUDIO_TOKEN_BASE,
    end_of_speech=END_OF_SPEECH, decoder_lookahead_frames=DECODER_LOOKAHEAD_FRAMES,
    tokens_per_char=6, minimum_budget=7 * 24,
)


def default_max_tokens(text: str, headroom: float = DEFAULT_BUDGET_HEADROOM) -> int:
    """A generation budget from the text length, a whole number of frames."""
    return FAMILY.default_max_tokens(text, headroom)
