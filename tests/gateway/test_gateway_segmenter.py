"""Sentence segmentation of whole texts and of text arriving in pieces."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from gateway.errors import GatewayError
from gateway.feed import TextFeed
from gateway.segmenter import Segmenter, has_speech, split_text, window_chars

# Each row: a text and the sentences a listener expects. The first piece is spoken on
# its own, so each of these splits (or non-splits) is audible.
SENTENCE_TABLE = [
    ("He lives at No. 5 Main Street. He is nice.", ["He lives at No. 5 Main Street.", "He is nice."]),
    ("It happened in Jan. 2020 at Acme Corp. in town. Then we left.",
     ["It happened in Jan. 2020 at Acme Corp. in town.", "Then we left."]),
    ("She has a Ph.D. in physics. Good for her.", ["She has a Ph.D. in physics.", "Good for her."]),
    ("1. Preheat the oven. 2. Mix the flour.", ["1. Preheat the oven.", "2. Mix the flour."]),
    ("Meet me at 5 p.m. Tomorrow we leave.", ["Meet me at 5 p.m.", "Tomorrow we leave."]),
    ("Call me at 5 p.m. today, please.", ["Call me at 5 p.m. today, please."]),
    ("Dr. Smith met J. R. R. Tolkien at 3.5 p.m. in the hall. Then he left.",
     ["Dr. Smith met J. R. R. Tolkien at 3.5 p.m. in the hall.", "Then he left."]),
    ("The U.S. economy grew. Mr. Jones agreed, e.g. on taxes.",
     ["The U.S. economy grew.", "Mr. Jones agreed, e.g. on taxes."]),
    ('He said "stop."  She stopped.\n\nA new paragraph', ['He said "stop."', "She stopped.", "A new paragraph"]),
    ("Wait... what? Yes!", ["Wait... what?", "Yes!"]),
]


def sentences_of(segmenter: Segmenter) -> list[str]:
    out = []
    while (piece := segmenter.take(single_sentence=True)) is not None:
        out.append(piece)
    return out


@pytest.mark.parametrize("text,expected", SENTENCE_TABLE, ids=[t[:24] for t, _ in SENTENCE_TABLE])
def test_sentence_table_whole_text(text, expected):
    seg = Segmenter(target_chars=240)
    seg.push(text)
    seg.end()
    assert sentences_of(seg) == expected


@pytest.mark.parametrize("step", [1, 3, 7])
@pytest.mark.parametrize("text,expected", SENTENCE_TABLE, ids=[t[:24] for t, _ in SENTENCE_TABLE])
def test_sentence_table_streamed_a_few_characters_at_a_time(text, expected, step):
    seg = Segmenter(target_chars=240)
    released = []
    for i in range(0, len(text), step):
        seg.push(text[i : i + step])
        released += sentences_of(seg)
        # What was released early is a prefix of the right answer: no early wrong split.
        assert released == expected[: len(released)], (text[: i + step], released)
    seg.end()
    assert released + sentences_of(seg) == expected


def test_pathological_text_is_examined_in_linear_time():
    """'a' followed by 19,999 dots took 12 s and blocked the gateway: every character is
    now handed to pysbd a bounded number of times, in windows of bounded size."""
    for text in ["a" + "." * 19_999, "a. " * 6_666, "x" * 20_000, "Mr. A. (b) 1.2 e.g. ? ! " * 800]:
        seg = Segmenter(target_chars=240)
        seg.push(text)
        seg.end()
        pieces = sentences_of(seg)
        assert all(len(p) <= 240 for p in pieces)
        assert seg.chars_examined <= 3 * len(text) + window_chars(240)
    streamed = Segmenter(target_chars=240)
    text = "a. " * 2_000
    for i in range(0, len(text), 5):
        streamed.push(text[i : i + 5])
    streamed.end()
    # Streaming re-reads only the unfinished tail, which stays under a window.
    assert streamed.chars_examined <= (len(text) // 5 + 1) * window_chars(240)
    assert " ".join(sentences_of(streamed)).split() == text.split()


def test_first_piece_is_the_first_sentence_then_sentences_are_packed():
    text = "Hi there. " + " ".join(f"Sentence number {i} is here." for i in range(10))
    pieces = split_text(text, target_chars=80)
    assert pieces[0] == "Hi there."
    assert all(len(p) <= 80 for p in pieces)
    assert len(pieces[1].split(". ")) > 1  # packed
    assert " ".join(pieces) == text.strip()


def test_nothing_is_lost_or_reordered():
    text = "One. Two! Three? Four... Five; six, seven. Eight\n\nNine"
    assert " ".join(split_text(text, target_chars=20)).split() == text.split()


def test_closing_quotes_stay_with_their_sentence_and_paragraphs_split():
    assert split_text('He said "stop." She stopped.\n\nA new paragraph', target_chars=16) == [
        'He said "stop."',
        "She stopped.",
        "A new paragraph",
    ]


def test_a_sentence_longer_than_a_piece_is_cut_at_a_clause_then_at_a_space():
    clause = "first part of a long sentence, " + "word " * 30 + "end."
    pieces = split_text(clause, target_chars=50)
    assert pieces[0] == "first part of a long sentence,"
    assert all(len(p) <= 50 for p in pieces)
    assert " ".join(pieces).split() == clause.split()
    assert split_text("x" * 120, target_chars=50) == ["x" * 50, "x" * 50, "x" * 20]


def test_whitespace_is_normalized_and_unspeakable_pieces_dropped():
    assert split_text("  Hello\n  world.   ...  !!  Bye.  ", target_chars=16) == ["Hello world.", "Bye."]
    assert split_text("... !!!", target_chars=16) == []
    assert not has_speech("... --- !!!")
    assert has_speech("Привет")


def test_incremental_sentence_is_ready_only_once_complete():
    seg = Segmenter(target_chars=100)
    for part in ["Hel", "lo wor", "ld.", " How"]:
        seg.push(part)
        assert not seg.ready  # "world." might still be "world.com", "How" might be "However,"
    seg.push(" ")  # a whole word follows: the boundary is settled
    assert seg.take(single_sentence=True) == "Hello world."
    seg.push("are you? I am")
    assert seg.take() == "How are you?"
    assert seg.take() is None
    seg.flush()  # speak "I am" now, unfinished
    assert seg.take() == "I am"
    seg.push(" fine. Thanks")
    seg.end()
    assert seg.take() == "fine. Thanks"
    assert seg.done
    with pytest.raises(ValueError):
        seg.push("more")


def test_incremental_pieces_join_words_split_across_pushes():
    seg = Segmenter(target_chars=16)
    for word in "alpha beta gamma delta epsilon zeta eta theta".split():
        seg.push(word + " ")
    seg.end()
    pieces = []
    while (p := seg.take()) is not None:
        pieces.append(p)
    assert " ".join(pieces) == "alpha beta gamma delta epsilon zeta eta theta"
    assert all(len(p) <= 16 for p in pieces)


def test_incremental_run_on_text_is_released_before_the_end():
    seg = Segmenter(target_chars=30)
    seg.push("and then " * 10)
    assert seg.ready  # no sentence end, but more than a piece is waiting


def test_taking_late_packs_what_completed_meanwhile():
    seg = Segmenter(target_chars=100)
    seg.push("One. Two. Three. Four ")
    assert seg.take() == "One. Two. Three."


# A deadline no test reaches.
LATER = time.monotonic() + 3600


def test_feed_waits_for_text_and_ends():
    async def scenario():
        feed = TextFeed(Segmenter(target_chars=100))
        waiter = asyncio.ensure_future(feed.next_piece(first=True, deadline=LATER))
        await asyncio.sleep(0)
        assert not waiter.done()
        await feed.push("Hello. How ")
        assert await waiter == "Hello."
        await feed.push("Bye")
        await feed.end()
        assert await feed.next_piece(first=False, deadline=LATER) == "How Bye"
        assert await feed.next_piece(first=False, deadline=LATER) is None

    asyncio.run(scenario())


def test_feed_failure_reaches_the_consumer():
    async def scenario():
        feed = TextFeed(Segmenter(target_chars=100))
        feed.fail(RuntimeError("bad input"))
        with pytest.raises(RuntimeError, match="bad input"):
            await feed.next_piece(first=True, deadline=LATER)

    asyncio.run(scenario())


def test_feed_waiting_past_its_deadline_is_deadline_exceeded():
    async def scenario():
        feed = TextFeed(Segmenter(target_chars=100))
        await feed.push("no sentence end yet")
        with pytest.raises(GatewayError) as err:
            await feed.next_piece(first=True, deadline=time.monotonic())
        return err.value

    err = asyncio.run(scenario())
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "waiting for more text" in err.message
