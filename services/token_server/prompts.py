"""From a request's text and voice to the prompt of the backbone this server loaded.

The backbone's family decides the prompt (chorus.speech.orpheus, chorus.speech.neutts),
and which family a GGUF is, is read from its vocabulary when it loads (`prompts_for`),
so `--model` alone says what the server speaks. An Orpheus voice is a name in the
prompt; a NeuTTS voice is a reference (transcript and NeuCodec codes) registered in the
voice store, read each time a request names it, so a voice registered anywhere is
usable here at once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from chorus.speech import neutts, orpheus
from chorus.speech.family import SpeechFamily
from chorus.speech.voice_store import VoiceStore, VoiceStoreError
from chorus.speech.voices import unknown_voice

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)
def _phonemes_of(phonemize: Callable[[str], str], text: str) -> str:
    return phonemize(text)


class PromptError(ValueError):
    """What the request must change for a prompt to be built; the message says what."""


class Prompts(Protocol):
    family: SpeechFamily
    # True when `build` may take a while (phonemizing, reading the store): call it off the event loop.
    blocking: bool

    def build(self, text: str, voice: str) -> list[int]:
        """Token ids of the prompt; PromptError on a voice or text it cannot speak."""


@dataclass(frozen=True)
class OrpheusPrompts:
    voices: tuple[str, ...]  # the default first
    tokenize: Callable[[str], list[int]]  # with BOS
    family: SpeechFamily = orpheus.FAMILY
    blocking: bool = False

    def build(self, text: str, voice: str) -> list[int]:
        voice = voice or self.voices[0]
        if (problem := unknown_voice(voice, self.voices)) is not None:
            raise PromptError(problem)
        return orpheus.wrap_prompt(self.tokenize(orpheus.prompt_text(text, voice)))


@dataclass(frozen=True)
class NeuTtsPrompts:
    vocabulary: neutts.NeuTtsVocabulary
    store: VoiceStore | None
    tokenize: Callable[[str], list[int]]  # without BOS
    phonemize: Callable[[str], str] | None  # for the phonemes input format
    blocking: bool = True

    @property
    def family(self) -> SpeechFamily:
        return self.vocabulary.family

    def _reference_phonemes(self, transcript: str) -> str:
        """A voice's transcript as phonemes: the same for every request naming the voice,
        so kept (by transcript, so a voice registered again under its name is not stale)."""
        return _phonemes_of(self.phonemize, transcript)

    def build(self, text: str, voice: str) -> list[int]:
        if self.store is None:
            raise PromptError("this token server serves a NeuTTS model and has no voice store (--voice-store): "
                              "NeuTTS speaks only voices registered from reference audio")
        if not voice:
            raise PromptError(f"name a voice: NeuTTS speaks voices registered from reference audio "
                              f"({', '.join(self.store.names()[:10]) or 'none registered yet'})")
        try:
            stored = self.store.get(voice, with_reference=False)
        except VoiceStoreError as err:
            raise PromptError(str(err)) from None
        codes = stored.codes.get(self.family.codec)
        if stored.family != neutts.NAME or codes is None or codes.size == 0:
            raise PromptError(f"voice {voice!r} was registered for {stored.family}, without {self.family.codec} codes: "
                              f"register it again for {neutts.NAME}")
        if int(codes.min()) < 0 or int(codes.max()) >= self.family.codebook_size:
            raise PromptError(f"voice {voice!r} has damaged codes (outside 0..{self.family.codebook_size - 1}): "
                              "register it again")
        reference_text, text = stored.transcript, text.replace("\x00", " ")
        if self.vocabulary.input_format == neutts.PHONEMES:
            reference_text, text = self._reference_phonemes(reference_text), self.phonemize(text)
            if not text:
                raise PromptError("the text has no words to speak")
        return self.vocabulary.prompt(self.tokenize, reference_text, codes.tolist(), text)


def prompts_for(backbone, voices: tuple[str, ...], voice_store: Path | None, language: str) -> Prompts:
    """The prompts of the family `backbone`'s vocabulary belongs to: NeuTTS when it holds
    NeuTTS's prompt specials, else Orpheus (what Chorus served before families)."""
    try:
        vocabulary = neutts.resolve(backbone.token_text, backbone.n_vocab, backbone.metadata(neutts.INPUT_FORMAT_KEY))
    except neutts.NotNeuTts:
        return OrpheusPrompts(voices, backbone.tokenize)
    phonemize = None
    if vocabulary.input_format == neutts.PHONEMES:
        from chorus.speech.phonemes import Phonemizer

        phonemize = Phonemizer(language)
        log.info("NeuTTS backbone reads phonemes: espeak-ng %s, %s", phonemize.version, language)
    store = VoiceStore(voice_store) if voice_store is not None else None
    return NeuTtsPrompts(vocabulary, store, lambda text: backbone.tokenize(text, add_bos=False), phonemize)
