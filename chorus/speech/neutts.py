"""The NeuTTS-Air protocol: a Qwen2 backbone that writes NeuCodec speech tokens.

One codebook of 65,536 codes at 50 frames a second, so a frame is one code and one
token, `<|speech_N|>`; `<|SPEECH_GENERATION_END|>` ends speech. NeuTTS has no fixed
voices: every prompt carries a reference (its transcript and its NeuCodec codes), and
the backbone continues the reference's codes with the new text's. The prompt, as
neutts 1.4.1 builds it for a GGUF backbone:

    user: Convert the text to speech:<|TEXT_PROMPT_START|>{reference text} {text}<|TEXT_PROMPT_END|>
    assistant:<|SPEECH_GENERATION_START|>{reference codes as <|speech_N|>}

where both texts are phonemes (espeak-ng IPA with stress, words separated by single
spaces) for a model whose GGUF says `neuphonic.input_format = phonemes` (NeuTTS-Air),
or the texts as written for `BPE` (later NeuTTS models, whose prompt also drops the
"user:"/"assistant:" frame). Token ids are not fixed here: a checkpoint's vocabulary
is read when it loads (`resolve`), so that real weights and the demo's alike find
their specials and speech tokens by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chorus.speech import codecs
from chorus.speech.family import SpeechFamily

NAME = "neutts-air"
CODEBOOK_SIZE = 65_536
SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = 480  # 50 frames a second
# The most frames the streaming NeuCodec decoder holds before it gives audio: a chunk
# (24) and its lookahead (4); the first audio comes sooner, after 8 + 4
# (services/codec_worker/neucodec_streaming.py).
DECODER_LOOKAHEAD_FRAMES = 28

TEXT_PROMPT_START = "<|TEXT_PROMPT_START|>"
TEXT_PROMPT_END = "<|TEXT_PROMPT_END|>"
SPEECH_GENERATION_START = "<|SPEECH_GENERATION_START|>"
SPEECH_GENERATION_END = "<|SPEECH_GENERATION_END|>"
SPECIALS = (TEXT_PROMPT_START, TEXT_PROMPT_END, SPEECH_GENERATION_START, SPEECH_GENERATION_END)
INPUT_FORMAT_KEY = "neuphonic.input_format"
# How neutts 1.4.1 samples a GGUF backbone: temperature 1 and top-k 50, the rest
# llama-cpp-python 0.3's defaults for a completion (top-p 0.95, min-p 0.05, no
# repetition penalty).
SAMPLING_DEFAULTS = (("temperature", 1.0), ("top_k", 50), ("top_p", 0.95), ("min_p", 0.05),
                     ("repetition_penalty", 1.0))
PHONEMES, BPE = "phonemes", "BPE"
_SPEECH_TOKEN = re.compile(r"<\|speech_(\d+)\|>")


def speech_token(code: int) -> str:
    return f"<|speech_{code}|>"


class VocabularyError(ValueError):
    """The checkpoint's vocabulary is not NeuTTS's; the message says what is missing."""


class NotNeuTts(VocabularyError):
    """The vocabulary has none of NeuTTS's prompt specials: another family's."""


@dataclass(frozen=True)
class NeuTtsVocabulary:
    """Where a checkpoint keeps NeuTTS's tokens, and how its prompt reads text."""

    family: SpeechFamily
    specials: dict[str, int]
    input_format: str

    def prompt(self, tokenize: Callable[[str], list[int]], reference_text: str, reference_codes: Sequence[int],
               text: str) -> list[int]:
        """Token ids of the prompt: `tokenize` turns plain text into ids (no specials,
        no BOS); the texts are phonemes already when the input format says so."""
        ids = self.specials
        codes = [self.family.code_token_id(int(code), 0) for code in reference_codes]
        body = [ids[TEXT_PROMPT_START], *tokenize(f"{reference_text} {text}"), ids[TEXT_PROMPT_END]]
        if self.input_format == PHONEMES:
            return [*tokenize("user: Convert the text to speech:"), *body, *tokenize("\nassistant:"),
                    ids[SPEECH_GENERATION_START], *codes]
        return [*body, ids[SPEECH_GENERATION_START], *codes]


def resolve(token_text: Callable[[int], str], n_vocab: int, input_format: str | None) -> NeuTtsVocabulary:
    """Finds the specials and the 65,536 speech tokens by name; they must be one run of
    consecutive ids in code order (so that the sampler reads a code's logits as one slice)."""
    specials: dict[str, int] = {}
    speech: dict[int, int] = {}
    for token_id in range(n_vocab):
        text = token_text(token_id)
        if text in SPECIALS:
            specials.setdefault(text, token_id)
        elif (match := _SPEECH_TOKEN.fullmatch(text)) is not None:
            speech.setdefault(int(match.group(1)), token_id)
    missing = [name for name in SPECIALS if name not in specials]
    if len(missing) == len(SPECIALS):
        raise NotNeuTts("the vocabulary has none of NeuTTS's prompt specials")
    if missing:
        raise VocabularyError(f"the vocabulary has no {', '.join(missing)}: not a NeuTTS backbone")
    base = speech.get(0)
    if base is None or len(speech) != CODEBOOK_SIZE or any(speech.get(c) != base + c for c in range(CODEBOOK_SIZE)):
        raise VocabularyError(
            f"the vocabulary's speech tokens are not <|speech_0|>..<|speech_{CODEBOOK_SIZE - 1}|> on consecutive ids "
            f"({len(speech)} found)"
        )
    fmt = input_format or PHONEMES  # NeuTTS-Air's GGUFs predate the key
    if fmt not in (PHONEMES, BPE):
        raise VocabularyError(f"{INPUT_FORMAT_KEY} is {fmt!r}; Chorus reads {PHONEMES!r} or {BPE!r}")
    return NeuTtsVocabulary(family(base, specials[SPEECH_GENERATION_END]), specials, fmt)


def family(code_token_base: int, end_of_speech: int) -> SpeechFamily:
    # About 14 characters of text a second of speech at 50 tokens a second: 3.6
    # tokens a character; at least 2 seconds.
    return SpeechFamily(
        name=NAME, codec=codecs.NEUCODEC_24KHZ, codes_per_frame=1, codebook_size=CODEBOOK_SIZE,
        sample_rate=SAMPLE_RATE, samples_per_frame=SAMPLES_PER_FRAME, code_token_base=code_token_base,
        end_of_speech=end_of_speech, decoder_lookahead_frames=DECODER_LOOKAHEAD_FRAMES,
        tokens_per_char=3.6, minimum_budget=100, resume_from_start=True, sampling_defaults=SAMPLING_DEFAULTS,
        clones_voices=True,
    )
