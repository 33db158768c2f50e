"""Frame-legal sampling: each filter does what its name says, rows are independent."""

from __future__ import annotations

import numpy as np
import pytest

from chorus.speech import orpheus
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


# -- every value validation accepts is safe all the way down ------------------------
#
# A request's numbers reach the sampler on the engine thread, where an exception would
# once kill the engine for every request (temperature 1e-40 made np.bincount raise).
# These properties draw parameters from everything the limits table accepts, float32
# denormals and exact edges included, against logits a broken model could produce.

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chorus.speech.limits import SAMPLING_RANGES

F32 = np.finfo(np.float32)
N_LEGAL = orpheus.CODEBOOK_SIZE + 1


def _float32_in(name: str):
    """Values of a float field that validation accepts, as the wire (float32) carries them."""
    low, high, brackets, _ = SAMPLING_RANGES[name]
    edges = [v for v in (low, high, 1e-45, 1e-40, F32.tiny, 1e-30, 1e-7, 0.5, 1 - 1e-7, np.nextafter(np.float32(high), np.float32(0)))
             if low <= v <= high]
    values = st.one_of(st.sampled_from(edges), st.floats(low, high, width=32))
    lowest_ok = (lambda v: v > low) if brackets[0] == "(" else (lambda v: v >= low)
    highest_ok = (lambda v: v < high) if brackets[1] == ")" else (lambda v: v <= high)
    return values.map(lambda v: float(np.float32(v))).filter(lambda v: lowest_ok(v) and highest_ok(v))


sampling_params = st.builds(
    SamplingParams,
    temperature=_float32_in("temperature"),
    top_p=_float32_in("top_p"),
    top_k=st.one_of(st.sampled_from([0, 1, 2, orpheus.CODEBOOK_SIZE - 1, orpheus.CODEBOOK_SIZE]),
                    st.integers(0, orpheus.CODEBOOK_SIZE)),
    min_p=_float32_in("min_p"),
    repetition_penalty=_float32_in("repetition_penalty"),
    seed=st.integers(0, 2**64 - 1),
)

ADVERSARIAL = [0.0, -0.0, 1e-45, -1e-45, 1e-40, 1.0, -1.0, 88.0, -104.0, 1e30, -1e30, F32.max, -F32.max,
               np.inf, -np.inf, np.nan]


@st.composite
def legal_rows(draw):
    """A (4097,) row of legal logits: a fill value (or noise), then adversarial values at random columns."""
    kind = draw(st.sampled_from(["fill", "noise"]))
    if kind == "fill":
        row = np.full(N_LEGAL, draw(st.sampled_from(ADVERSARIAL)), dtype=np.float32)
    else:
        scale = draw(st.sampled_from([1e-30, 1.0, 30.0, 1e30]))
        row = (np.random.default_rng(draw(st.integers(0, 2**32))).standard_normal(N_LEGAL) * scale).astype(np.float32)
    for column, value in draw(st.lists(st.tuples(st.integers(0, N_LEGAL - 1), st.sampled_from(ADVERSARIAL)),
                                       max_size=12)):
        row[column] = value
    return row


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(legal_rows(), min_size=1, max_size=4),
    params=st.lists(sampling_params, min_size=4, max_size=4),
    data=st.data(),
)
def test_any_accepted_parameters_and_any_logits_give_a_legal_pick(rows, params, data):
    n = len(rows)
    positions = np.array(data.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)))
    eos_allowed = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    samplers = [SequenceSampler(p) for p in params[:n]]
    for sampler, position in zip(samplers, positions):
        for code in data.draw(st.lists(st.integers(0, orpheus.CODEBOOK_SIZE - 1), max_size=5)):
            sampler.record(int(position), code)  # something for the repetition penalty to act on
    legal = np.stack(rows)
    original = legal.copy()
    with np.errstate(invalid="raise"):  # no NaN made and no invalid cast left for numpy to paper over
        picks = sample(legal, samplers, positions, eos_allowed)
    assert picks.shape == (n,)
    for i, pick in enumerate(picks.tolist()):
        assert 0 <= pick <= EOS_COLUMN
        assert pick != EOS_COLUMN or eos_allowed[i], "end of speech picked where it is not allowed"
        possible = np.isfinite(original[i]) | (original[i] == np.inf)
        possible[EOS_COLUMN] &= eos_allowed[i]
        if possible.any():
            assert possible[pick], f"picked column {pick} of logit {original[i, pick]} over possible ones"


def test_denormal_temperature_samples_like_greedy():
    """The reported crash: temperature 1e-40 (a float32 denormal) passes validation."""
    rng = np.random.default_rng(3)
    legal = rng.standard_normal((2, N_LEGAL)).astype(np.float32)
    samplers = [SequenceSampler(SamplingParams(temperature=t, top_p=1.0, repetition_penalty=1.0))
                for t in (float(np.float32(1e-40)), 1e-45)]
    picks = sample(legal.copy(), samplers, np.array([0, 0]), np.array([False, False]))
    assert picks.tolist() == np.argmax(legal[:, :orpheus.CODEBOOK_SIZE], axis=1).tolist()


def test_a_row_with_no_possible_code_still_gives_a_legal_code():
    """A model that emits no finite logit (NaN everywhere) gets a code, not an exception:
    the frame stays decodable and the request ends at its budget."""
    legal = np.full((2, N_LEGAL), np.nan, dtype=np.float32)
    legal[1] = -np.inf
    samplers = [SequenceSampler(SamplingParams(seed=s)) for s in (1, 2)]
    picks = sample(legal, samplers, np.array([3, 3]), np.array([False, False]))
    assert all(0 <= p < orpheus.CODEBOOK_SIZE for p in picks.tolist())


def test_ties_at_the_top_share_the_draw_at_any_temperature():
    """All-equal logits: every code stays possible, even at the smallest temperature."""
    legal = np.zeros((1, N_LEGAL), dtype=np.float32)
    sampler = SequenceSampler(SamplingParams(temperature=float(np.float32(1e-40)), top_p=1.0, seed=5,
                                             repetition_penalty=1.0))
    picks = {int(sample(legal.copy(), [sampler], np.array([0]), np.array([False]))[0]) for _ in range(50)}
    assert len(picks) > 40


def test_huge_logits_keep_their_order():
    legal = np.full((1, N_LEGAL), -F32.max, dtype=np.float32)
    legal[0, 7], legal[0, 9] = F32.max, F32.max / 2
    sampler = SequenceSampler(SamplingParams(temperature=2.0, top_p=1.0, repetition_penalty=0.5))
    sampler.record(0, 9)  # a penalty below 1 raises it past float32's range
    with np.errstate(invalid="raise"):
        pick = sample(legal, [sampler], np.array([0]), np.array([False]))[0]
    assert pick in (7, 9)


# --- wide rows (NeuTTS-Air's 65,537 columns) are cut to their candidates first -------

def _wide_case(rng: np.random.Generator, n_rows: int):
    """Rows of 65,537 columns with the values that stress a cut: ties (logits on a coarse
    grid), -inf and NaN stretches, +inf, a dead row, end of speech barred."""
    from chorus.speech import neutts

    family = neutts.family(10, 9)
    vocab = family.code_token_base + family.codebook_size + 2
    rows = []
    for _ in range(n_rows):
        row = rng.standard_normal(vocab).astype(np.float32) * rng.choice([0.5, 3.0, 20.0])
        kind = rng.integers(6)
        if kind == 0:
            row = np.round(row * 2) / 2  # many exact ties
        elif kind == 1:
            row[rng.integers(vocab, size=vocab // 3)] = -np.inf
        elif kind == 2:
            row[rng.integers(vocab, size=50)] = np.nan
        elif kind == 3:
            row[rng.integers(vocab, size=3)] = np.inf
        elif kind == 4:
            row[:] = -np.inf  # dead: codes uniform
        rows.append(row)
    params = [SamplingParams(
        temperature=float(rng.choice([0.0, 1e-40, 0.05, 0.7, 1.0, 2.0])),
        top_k=int(rng.choice([0, 1, 50, 4096])),
        min_p=float(rng.choice([0.0, 0.05, 0.5, 0.999])),
        top_p=float(rng.choice([0.1, 0.9, 0.95, 1.0])),
        repetition_penalty=float(rng.choice([1.0, 1.3])),
        seed=int(rng.integers(2**32)),
    ) for _ in range(n_rows)]
    positions = np.zeros(n_rows, dtype=np.int64)
    eos = rng.random(n_rows) < 0.5
    return family, rows, params, positions, eos


def test_cutting_wide_rows_to_their_candidates_picks_exactly_what_the_whole_rows_pick(monkeypatch):
    """The cut (sampler._narrowed) is an optimization, not a change: on the same logits,
    parameters and generators, every pick is the same as sampling the whole row."""
    import services.token_server.sampler as sampler_module

    rng = np.random.default_rng(20261205)
    compared = cut = 0
    for _ in range(150):
        family, rows, params, positions, eos = _wide_case(rng, int(rng.integers(1, 4)))

        def picks(narrow_from: int) -> np.ndarray:
            monkeypatch.setattr(sampler_module, "NARROW_FROM_COLUMNS", narrow_from)
            samplers = [SequenceSampler(p, family) for p in params]
            for s in samplers:
                s.seen[0, :64] = True  # a few generated codes, for the penalty
            return np.concatenate([sample(gather_legal_logits(rows, positions, family), samplers, positions, eos)
                                   for _ in range(3)])

        whole, narrowed = picks(10**9), picks(8192)
        np.testing.assert_array_equal(narrowed, whole)
        compared += whole.size
        cut += all(p.temperature > 0 and (0 < p.top_k < 65_537 or p.min_p > 0) for p in params)
    assert compared > 300 and cut > 20  # the cut itself was taken, many times


def test_a_wide_row_is_cut_to_its_top_k_and_min_p_candidates():
    import services.token_server.sampler as sampler_module

    row = np.linspace(-10, 10, 65_537, dtype=np.float32)[None]
    candidates, columns = sampler_module._narrowed(row, np.array([1.0], np.float32), np.array([50]),
                                                   np.array([0.0], np.float32))
    assert columns[0, -1] == 65_536 and 50 <= candidates.shape[1] < 60  # the 50 best and a margin's few more
    assert sampler_module._narrowed(row, np.array([1.0], np.float32), np.array([0]),
                                    np.array([0.0], np.float32)) is None  # top-p alone needs the whole row
