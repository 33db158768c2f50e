"""Sentence segmentation of whole texts and of text arriving in pieces."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from gateway.errors import GatewayError
from gateway.feed import TextFeed
from gateway.segmenter import Segmenter, has_speech, split_text


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


def test_abbreviations_initials_and_decimals_do_not_end_sentences():
    text = "Dr. Smith met J. R. R. Tolkien at 3.5 p.m. in the hall, e.g. the big one. Then he left."
    assert split_text(text, target_chars=100) == [
        "Dr. Smith met J. R. R. Tolkien at 3.5 p.m. in the hall, e.g. the big one.",
        "Then he left.",
    ]


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
    for part in ["Hel", "lo wor", "ld."]:
        seg.push(part)
        assert not seg.ready  # "world." might still be "world.com"
    seg.push(" How")
    assert seg.take(single_sentence=True) == "Hello world."
    seg.push(" are you? I am")
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
    seg.push("One. Two. Three. ")
    assert seg.take() == "One. Two. Three."


# A deadline no test reaches.
LATER = time.monotonic() + 3600


def test_feed_waits_for_text_and_ends():
    async def scenario():
        feed = TextFeed(Segmenter(target_chars=100))
        waiter = asyncio.ensure_future(feed.next_piece(first=True, deadline=LATER))
        await asyncio.sleep(0)
        assert not waiter.done()
        feed.push("Hello. ")
        assert await waiter == "Hello."
        feed.push("Bye")
        feed.end()
        assert await feed.next_piece(first=False, deadline=LATER) == "Bye"
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
        feed.push("no sentence end yet")
        with pytest.raises(GatewayError) as err:
            await feed.next_piece(first=True, deadline=time.monotonic())
        return err.value

    err = asyncio.run(scenario())
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "waiting for more text" in err.message
