"""Text to phonemes, for backbones that read phonemes (NeuTTS-Air).

NeuTTS-Air was trained on espeak-ng's IPA with stress marks and punctuation kept,
words separated by single spaces; a different phonemizer (or espeak-ng version)
would feed it text it never saw. espeak-ng 1.52 comes from PyPI with its data
(`espeakng-loader`), the version the `neutts` package bundles, so no system package
is needed; `phonemizer` drives it with the options neutts uses. Both are imported
only when a phonemes model is served: the other services and families never load them.
"""

from __future__ import annotations

import threading

DEFAULT_LANGUAGE = "en-us"


class PhonemizerError(RuntimeError):
    """espeak-ng could not be loaded or refused the language; the message says which."""


class Phonemizer:
    """espeak-ng for one language. Calls are serialized: espeak-ng keeps global state."""

    def __init__(self, language: str = DEFAULT_LANGUAGE) -> None:
        try:
            import espeakng_loader
            from phonemizer.backend import EspeakBackend
            from phonemizer.backend.espeak.wrapper import EspeakWrapper
        except ImportError as err:
            raise PhonemizerError(f"phonemes need the token-server extra (phonemizer, espeakng-loader): {err}") from err
        EspeakWrapper.set_library(espeakng_loader.get_library_path())
        EspeakWrapper.set_data_path(espeakng_loader.get_data_path())
        try:
            self._backend = EspeakBackend(language=language, preserve_punctuation=True, with_stress=True,
                                          words_mismatch="ignore", language_switch="remove-flags")
        except RuntimeError as err:
            raise PhonemizerError(f"espeak-ng refused language {language!r}: {err}") from err
        self.language = language
        self.version = ".".join(str(v) for v in self._backend.version())
        self._lock = threading.Lock()

    def __call__(self, text: str) -> str:
        with self._lock:
            phones = self._backend.phonemize([text])  # [] for text with no words
        return " ".join(phones[0].split()) if phones else ""
