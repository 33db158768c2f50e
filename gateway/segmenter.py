"""Splits text into the pieces the backbone speaks one prompt at a time.

Why pieces: the backbone's cost to first audio grows with the prompt, and its
context caps how much audio one prompt can produce, so a long text is spoken as a
run of short prompts generated ahead of playback. Why sentence boundaries: a cut
mid-sentence breaks prosody, and speech models end sentences in near-silence, which
is where a join is inaudible.

The same segmenter serves a whole text (push it, end it) and text arriving as an LLM
writes it (push pieces, flush, end). It is pull-based: the pipeline takes a piece
when it has room to start another generation, and gets every sentence completed by
then, packed up to `target_chars`. So a fast pipeline speaks each sentence as soon as
it is complete, and a busy one gets fewer, longer prompts instead of a backlog.
"""

from __future__ import annotations

import re
from collections import deque

# A sentence ends at terminal punctuation (and any closing quotes or brackets) that
# is followed by whitespace. Requiring the whitespace is what makes this safe on a
# growing buffer: "3." may yet become "3.5", "Hello." followed by nothing may yet be
# followed by a quote. CJK full stops need no space. A blank line ends a paragraph.
_SENTENCE_END = re.compile(
    r"[.!?\u2026]+[\"'\u201d\u2019\u00bb)\]]*(?=\s)"
    r"|[\u3002\uff01\uff1f]+[\"\u201d\u2019\u300d\u300f)]*"
    r"|\n[ \t\r\f\v]*\n"
)
# Where to cut a sentence too long for one prompt: after a clause, else at a space.
_CLAUSE_END = re.compile(r"[,;:\u2014\u2013)](?=\s)")
# "Dr. Smith", "J. R. R. Tolkien" and "3 p.m. today" are not sentence ends.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc fig approx dept inc ltd mt".split()
)
_DOTTED = re.compile(r"^(?:\w\.)+\w$")  # p.m, e.g, U.S

DEFAULT_TARGET_CHARS = 240


def _normalize(text: str) -> str:
    return " ".join(text.split())


def _speakable(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _is_abbreviation(text: str, dot: int) -> bool:
    """True when the '.' at `dot` closes an abbreviation or an initial."""
    if text[dot] != "." or (dot + 1 < len(text) and text[dot + 1] == "."):
        return False
    start = dot
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start:dot].lower()
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()) or bool(_DOTTED.match(word))


def _sentence_ends(text: str) -> list[int]:
    """Offsets just past each complete sentence in `text`."""
    return [m.end() for m in _SENTENCE_END.finditer(text) if not _is_abbreviation(text, m.start())]


def _cut_point(text: str, limit: int) -> int:
    """Where to cut `text` (longer than `limit`) so the head fits: a clause end, else a space, else hard."""
    window = text[: limit + 1]
    clauses = [m.end() for m in _CLAUSE_END.finditer(window) if m.end() <= limit]
    if clauses and clauses[-1] > limit // 3:
        return clauses[-1]
    space = window.rfind(" ", 0, limit + 1)
    return space if space > 0 else limit


def _bounded(sentence: str, limit: int) -> list[str]:
    """A normalized sentence cut into parts of at most `limit` characters."""
    parts = []
    while len(sentence) > limit:
        cut = _cut_point(sentence, limit)
        parts.append(sentence[:cut].strip())
        sentence = sentence[cut:].strip()
    parts.append(sentence)
    return [p for p in parts if p]


class Segmenter:
    """Text in (`push`, `flush`, `end`), speakable pieces out (`take`)."""

    def __init__(self, target_chars: int = DEFAULT_TARGET_CHARS) -> None:
        if target_chars < 16:
            raise ValueError(f"target_chars must be at least 16, got {target_chars}")
        self.target_chars = target_chars
        self._buffer = ""  # text not yet known to end a sentence
        self._sentences: deque[str] = deque()  # complete, normalized, each <= target_chars
        self._ended = False

    @property
    def ready(self) -> bool:
        """A piece can be taken now."""
        return bool(self._sentences)

    @property
    def done(self) -> bool:
        """Input ended and every piece was taken."""
        return self._ended and not self._sentences

    @property
    def buffered_chars(self) -> int:
        return len(self._buffer) + sum(len(s) for s in self._sentences)

    def push(self, text: str) -> None:
        if self._ended:
            raise ValueError("text pushed after the end of input")
        self._buffer += text
        ends = _sentence_ends(self._buffer)
        if ends:
            self._complete(self._buffer[: ends[-1]])
            self._buffer = self._buffer[ends[-1] :]
        # A run-on without punctuation (or an LLM's long list) must not wait for
        # the end: release the whole parts once it exceeds a piece.
        if len(_normalize(self._buffer)) > self.target_chars:
            parts = _bounded(_normalize(self._buffer), self.target_chars)
            self._add(parts[:-1])
            # Keep a trailing space: the next push may start a new word.
            self._buffer = parts[-1] + (" " if self._buffer[-1].isspace() else "")

    def flush(self) -> None:
        """Make everything buffered speakable now, even an unfinished sentence."""
        self._complete(self._buffer)
        self._buffer = ""

    def end(self) -> None:
        """No more text; what is buffered becomes the last pieces."""
        self.flush()
        self._ended = True

    def take(self, single_sentence: bool = False) -> str | None:
        """The next piece: complete sentences packed up to `target_chars`, or one
        sentence when `single_sentence` (the first piece, whose length is the time to
        first audio). None when nothing is ready."""
        if not self._sentences:
            return None
        piece = self._sentences.popleft()
        while not single_sentence and self._sentences:
            nxt = self._sentences[0]
            if len(piece) + 1 + len(nxt) > self.target_chars:
                break
            piece = f"{piece} {self._sentences.popleft()}"
        return piece

    def _complete(self, text: str) -> None:
        start = 0
        for end in [*_sentence_ends(text), len(text)]:
            self._add(_bounded(_normalize(text[start:end]), self.target_chars))
            start = end

    def _add(self, sentences: list[str]) -> None:
        self._sentences.extend(s for s in sentences if _speakable(s))


def split_text(text: str, target_chars: int = DEFAULT_TARGET_CHARS) -> list[str]:
    """A whole text as the pipeline would take it: the first sentence alone, then
    sentences packed up to `target_chars`."""
    segmenter = Segmenter(target_chars)
    segmenter.push(text)
    segmenter.end()
    pieces = []
    while (piece := segmenter.take(single_sentence=not pieces)) is not None:
        pieces.append(piece)
    return pieces


def has_speech(text: str) -> bool:
    """Whether `text` has anything to say (a letter or digit)."""
    return _speakable(text)
