"""Splits text into the pieces the backbone speaks one prompt at a time.

Why pieces: the backbone's cost to first audio grows with the prompt, and its
context caps how much audio one prompt can produce, so a long text is spoken as a
run of short prompts generated ahead of playback. Why sentence boundaries: a cut
mid-sentence breaks prosody, and speech models end sentences in near-silence, which
is where a join is inaudible. The first piece is spoken on its own, so a wrong split
("No. | 5", "Ph.D. | in") is heard: sentence boundaries come from pysbd, a rule-based
segmenter that knows abbreviations, initials, numbered items and times.

The same segmenter serves a whole text (push it, end it) and text arriving as an LLM
writes it (push pieces, flush, end). It is pull-based: the pipeline takes a piece
when it has room to start another generation, and gets every sentence completed by
then, packed up to `target_chars`. So a fast pipeline speaks each sentence as soon as
it is complete, and a busy one gets fewer, longer prompts instead of a backlog.

Text still arriving is held back: a boundary is trusted only once a whole word
follows it, because the next word decides it ("5 p.m. Tomorrow" splits, "5 p.m. to"
does not). Pushes without whitespace cannot complete a word, so they cost nothing.

Linear time: pysbd's cost grows faster than its input (many short sentences), so it
only ever sees a bounded window of text (about two pieces); the segmenter slides the
window over longer text, carrying the unfinished last sentence into the next one.
Every character is examined a bounded number of times, whatever the text. Callers
run long texts off the event loop (gateway/feed.py).
"""

from __future__ import annotations

import re
from collections import deque

import pysbd

# A blank line ends a paragraph, whatever the punctuation.
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")
# Where to cut a sentence too long for one prompt: after a clause, else at a space.
_CLAUSE_END = re.compile(r"[,;:\u2014\u2013)](?=\s)")
# A whole word: something, then the whitespace that ends it.
_WHOLE_WORD = re.compile(r"\S\s")

DEFAULT_TARGET_CHARS = 240


def _normalize(text: str) -> str:
    return " ".join(text.split())


_LETTER_OR_DIGIT = re.compile(r"[^\W_]")


def _speakable(text: str) -> bool:
    return _LETTER_OR_DIGIT.search(text) is not None


def window_chars(target_chars: int) -> int:
    """The most text pysbd sees at once: two pieces and some context."""
    return 2 * target_chars + 64


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
    """Text in (`push`, `flush`, `end`), speakable pieces out (`take`).

    Not thread-safe: one caller at a time (the feed serializes them)."""

    def __init__(self, target_chars: int = DEFAULT_TARGET_CHARS) -> None:
        if target_chars < 16:
            raise ValueError(f"target_chars must be at least 16, got {target_chars}")
        self.target_chars = target_chars
        self._window = window_chars(target_chars)
        # pysbd keeps per-call state in its Segmenter: one per instance.
        self._sbd = pysbd.Segmenter(language="en", clean=False, char_span=False)
        self._buffer = ""  # text not yet known to end a sentence
        self._sentences: deque[str] = deque()  # complete, normalized, each <= target_chars
        self._sentence_chars = 0
        self._ended = False
        # Characters handed to pysbd so far: a test bounds it by the text's length.
        self.chars_examined = 0

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
        return len(self._buffer) + self._sentence_chars

    def push(self, text: str) -> None:
        if self._ended:
            raise ValueError("text pushed after the end of input")
        self._buffer += text
        if any(ch.isspace() for ch in text) or len(self._buffer) > self.target_chars:
            self._scan(final=False)

    def flush(self) -> None:
        """Make everything buffered speakable now, even an unfinished sentence."""
        self._scan(final=True)

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
        piece = self._pop()
        while not single_sentence and self._sentences:
            if len(piece) + 1 + len(self._sentences[0]) > self.target_chars:
                break
            piece = f"{piece} {self._pop()}"
        return piece

    def _pop(self) -> str:
        sentence = self._sentences.popleft()
        self._sentence_chars -= len(sentence)
        return sentence

    def _scan(self, final: bool) -> None:
        """Moves every sentence known to be complete from the buffer to the queue."""
        # Paragraphs end where they end: everything before a blank line is final.
        while (gap := _PARAGRAPH.search(self._buffer)) is not None:
            head, self._buffer = self._buffer[: gap.start()], self._buffer[gap.end() :]
            self._segment(head, final=True)
        trailing = self._buffer[len(self._buffer.rstrip()) :]
        rest = self._segment(self._buffer, final)
        # Keep the raw trailing whitespace: the next push may start a new word, or
        # finish a blank line.
        self._buffer = rest.rstrip() + trailing if rest.strip() else ""

    def _segment(self, text: str, final: bool) -> str:
        """Queues the complete sentences of `text` (all of it when `final`); returns the rest, normalized."""
        # Whitespace collapsed (pysbd misses "stop."  She), a trailing space kept: it
        # tells that the last word is whole.
        text = _normalize(text) + (" " if text[-1:].isspace() and text.strip() else "")
        while text:
            window = text[: self._window]
            whole = len(window) == len(text)
            self.chars_examined += len(window)
            sentences = self._sbd.segment(window)
            if not (whole and final):
                sentences = _complete_only(sentences)
            if not sentences and not whole:
                # One sentence fills the window: cut it where a piece would be cut.
                sentences = [window[: _cut_point(window, self.target_chars)]]
            taken = sum(map(len, sentences))
            for sentence in sentences:
                self._add(_bounded(_normalize(sentence), self.target_chars))
            text = text[taken:].lstrip()
            if whole or taken == 0:
                break
        if text and len(text) > self.target_chars:
            # A run-on without sentence ends (or an LLM's long list) must not wait for
            # the end: release the whole parts once it exceeds a piece.
            parts = _bounded(text, self.target_chars)
            self._add(parts[:-1])
            text = parts[-1]
        return text

    def _add(self, sentences: list[str]) -> None:
        for sentence in sentences:
            if _speakable(sentence):
                self._sentences.append(sentence)
                self._sentence_chars += len(sentence)


def _complete_only(sentences: list[str]) -> list[str]:
    """The sentences of a text that may still grow whose ends are settled: all but
    the last, and not the one before it unless a whole word follows."""
    done = sentences[:-1]
    if done and not _WHOLE_WORD.search(sentences[-1]):
        done = done[:-1]
    return done


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
