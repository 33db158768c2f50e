"""What a model family's backbone writes, as the token server reads it.

A family (Orpheus: a Llama writing SNAC codes; NeuTTS-Air: a Qwen2 writing NeuCodec
codes) differs in its vocabulary layout, its frames and its codec; the engine,
scheduler, sampler, capacity model and relays take those facts from a SpeechFamily
instead of from one family's module, so that they run either unchanged. How a prompt
is built is the family's own module (orpheus.py, neutts.py): it needs the text side
(a tokenizer, for NeuTTS a phonemizer and a voice's reference codes).

Codes of a frame position are consecutive token ids: position p's code c is token
`code_token_base + p * codebook_size + c`. End of speech is one token, legal only at a
frame boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

ORPHEUS = "orpheus"  # the first family: what an empty family field means on the wire


def reported_family(name: str) -> str:
    """The family a peer reports (GetStatusResponse.family); empty from a peer older than the field."""
    return name or ORPHEUS


@dataclass(frozen=True)
class SpeechFamily:
    name: str
    codec: str  # what its streams ask codec workers for (chorus.speech.codecs)
    codes_per_frame: int
    codebook_size: int
    sample_rate: int
    samples_per_frame: int
    code_token_base: int
    end_of_speech: int
    # Frames before the decoder gives its first audio, and the context a resumed
    # stream resends before the first frame it needs.
    decoder_lookahead_frames: int
    # A budget from the text (default_max_tokens): tokens a character of text takes
    # to speak, and the least budget.
    tokens_per_char: float
    minimum_budget: int
    # A stream resumed on another codec worker resends every frame from the first
    # (its decoder's output depends on context a few frames cannot restore), rather
    # than decoder_lookahead_frames of context.
    resume_from_start: bool = False
    # Sampling defaults that differ from Chorus's own (Orpheus's): (field, value) pairs
    # for a request's unset sampling fields, as the family's reference code samples.
    sampling_defaults: tuple[tuple[str, float], ...] = ()
    # Its voices are cloned from reference recordings, encoded once by its codec's
    # encoder (Orpheus has fixed voices only).
    clones_voices: bool = False

    def __post_init__(self) -> None:
        if min(self.codes_per_frame, self.codebook_size, self.sample_rate, self.samples_per_frame) <= 0:
            raise ValueError(f"{self.name}: frame sizes and rates must be positive")
        codes_end = self.code_token_base + self.codes_per_frame * self.codebook_size
        if self.code_token_base < 0 or self.code_token_base <= self.end_of_speech < codes_end:
            raise ValueError(f"{self.name}: end of speech ({self.end_of_speech}) must lie outside the code tokens")

    @property
    def eos_column(self) -> int:
        """The column of end of speech in a row of legal logits (after the codes)."""
        return self.codebook_size

    @property
    def frame_seconds(self) -> float:
        return self.samples_per_frame / self.sample_rate

    @property
    def tokens_per_audio_second(self) -> float:
        return self.codes_per_frame / self.frame_seconds

    def code_token_range(self, position: int) -> tuple[int, int]:
        """[first, last+1) token ids that are legal at `position` of a frame."""
        if not 0 <= position < self.codes_per_frame:
            raise ValueError(f"frame position {position} outside 0..{self.codes_per_frame - 1}")
        first = self.code_token_base + position * self.codebook_size
        return first, first + self.codebook_size

    def code_token_id(self, code: int, position: int) -> int:
        """Token id that carries `code` at `position` of a frame."""
        if not 0 <= code < self.codebook_size:
            raise ValueError(f"code {code} outside 0..{self.codebook_size - 1}")
        return self.code_token_range(position)[0] + code

    def default_max_tokens(self, text: str, headroom: float) -> int:
        """A generation budget from the text's length, a whole number of frames: the
        text's expected speech times `headroom`, plus two seconds."""
        budget = max(self.minimum_budget,
                     int(len(text) * self.tokens_per_char * headroom) + round(2 * self.tokens_per_audio_second))
        return budget - budget % self.codes_per_frame
