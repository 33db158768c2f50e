"""Frame-legal sampling: each filter does what its name says, rows are independent."""

from __future__ import annotations

import numpy as np
import pytest

from chorus import orpheus
from services.token_server.sampler import EOS_COLUMN, SamplingParams, SequenceSampler, gather_legal_logits, sample


def row_with(probs: list[float], position: int = 0, eos: float = -np.inf) -> np.ndarray:
    """A full-vocabulary logits row whose legal columns at `position` carry `probs`."""
    legal = np.log(np.array(probs + [1e-12] * (orpheus.CODEBOOK_SIZE - len(probs)), dtype=np.float32))
    row = np.full(orpheus.VOCAB_SIZE, -np.inf, dtype=np.float32)
    first, last = orpheus.audio_token_range(position)
    row[first:last] = legal
    row[orpheus.END_OF_SPEECH] = eos
    return row


def frequencies(probs, n=6000, position=0, **params) -> np.ndarray:
    sampler = SequenceSampler(SamplingParams(seed=11, repetition_penalty=1.0, **params))
    picks = [
        int(sample(gather_legal_logits([row_with(probs, position)], np.array([position])), [sampler],
                   np.array([position]), np.array([False]))[0])
        for _ in range(n)
    ]
    return np.bincount(picks, minlength=len(probs))[: len(probs)] / n


def test_plain_sampling_follows_the_distribution():
    assert frequencies([0.5, 0.3, 0.2], temperature=1.0, top_p=1.0) == pytest.approx([0.5, 0.3, 0.2], abs=0.03)


@pytest.mark.parametrize("top_p, expected", [(0.75, [0.625, 0.375, 0.0]), (0.5, [1.0, 0.0, 0.0])])
def test_top_p_keeps_the_smallest_nucleus(top_p, expected):
    assert frequencies([0.5, 0.3, 0.2], temperature=1.0, top_p=top_p) == pytest.approx(expected, abs=0.03)


def test_top_k_and_min_p():
    assert frequencies([0.4, 0.35, 0.25], temperature=1.0, top_p=1.0, top_k=1)[0] == 1.0
    got = frequencies([0.6, 0.3, 0.1], temperature=1.0, top_p=1.0, min_p=0.3)  # 0.1 < 0.3 * 0.6
    assert got == pytest.approx([2 / 3, 1 / 3, 0.0], abs=0.03)


def test_greedy_and_repetition_penalty():
    sampler = SequenceSampler(SamplingParams(temperature=0.0, repetition_penalty=1.5))
    row = row_with([0.4, 0.35, 0.25])
    first = sample(gather_legal_logits([row], np.array([0])), [sampler], np.array([0]), np.array([False]))[0]
    assert first == 0
    sampler.record(0, int(first))
    again = sample(gather_legal_logits([row], np.array([0])), [sampler], np.array([0]), np.array([False]))[0]
    assert again == 1  # the generated code was penalized below the runner-up


def test_end_of_speech_only_where_allowed():
    row = row_with([0.1, 0.1], eos=10.0)  # end of speech far more likely than any code
    legal = gather_legal_logits([row, row], np.array([0, 0]))
    samplers = [SequenceSampler(SamplingParams(temperature=0.0)) for _ in range(2)]
    picks = sample(legal, samplers, np.array([0, 0]), np.array([True, False]))
    assert picks[0] == EOS_COLUMN and picks[1] != EOS_COLUMN


def test_positions_select_their_own_columns():
    rows = [row_with([0.1, 0.9], position=p) for p in range(7)]
    legal = gather_legal_logits(rows, np.arange(7))
    assert legal.shape == (7, orpheus.CODEBOOK_SIZE + 1)
    assert (np.argmax(legal[:, :orpheus.CODEBOOK_SIZE], axis=1) == 1).all()


def test_a_row_samples_the_same_whatever_shares_the_batch():
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(orpheus.VOCAB_SIZE).astype(np.float32) for _ in range(5)]

    def picks(indices):
        samplers = {i: SequenceSampler(SamplingParams(seed=100 + i)) for i in indices}
        out = {i: [] for i in indices}
        for step in range(20):
            pos = np.full(len(indices), step % 7)
            chosen = sample(gather_legal_logits([rows[i] for i in indices], pos), [samplers[i] for i in indices],
                            pos, np.zeros(len(indices), bool))
            for i, c in zip(indices, chosen.tolist()):
                samplers[i].record(step % 7, c)
                out[i].append(c)
        return out

    alone = picks([3])[3]
    assert picks([0, 1, 2, 3, 4])[3] == alone
    assert picks([4, 3])[3] == alone


@pytest.mark.parametrize("bad", [dict(temperature=3.0), dict(top_p=0.0), dict(top_k=-1), dict(min_p=1.0),
                                 dict(repetition_penalty=0.1), dict(top_k=4097)])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
