"""Frame-legal sampling, vectorized across the slots of one engine step.

The backbone may only emit, at frame position p, one of the 4096 audio tokens of
that position, or end of speech at a frame boundary once a frame exists. Restricting
the logits to those 4097 columns before sampling means every frame decodes, and
makes sampling cheap (4097 columns instead of 156,940). All slots of a step are
sampled together in numpy so that the Python around llama_decode stays small.
NeuTTS-Air's rows are 65,537 columns; with top-k or min-p on (its defaults) each is
first cut to the few dozen columns those rules can keep, which picks exactly what the
whole row would (_narrowed) at a fraction of the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chorus.speech import orpheus
from chorus.speech.family import SpeechFamily
from chorus.speech.limits import sampling_problems

# Log-probability buckets for the top-p threshold search (see nucleus_pick): 1/8 nat
# wide, down to 64 nats below the best column.
_BUCKETS_PER_NAT = 8
_N_BUCKETS = 512
EOS_COLUMN = orpheus.FAMILY.eos_column  # Orpheus's column of end of speech in a gathered row: its last
# Validation accepts any temperature above 0, float32 denormals (1e-40) included.
# Dividing by a denormal overflows, and on a thread that flushes denormals to zero
# (a BLAS or torch may set that) it divides by zero; a temperature below the
# smallest normal float32 samples the same as that smallest normal one (both keep
# only the top logits), so it is raised to it.
_SMALLEST_TEMPERATURE = np.finfo(np.float32).tiny
_FLOAT32_MAX = np.finfo(np.float32).max
# Rows this wide (NeuTTS-Air's 65,537 columns) are first cut to the columns top-k and
# min-p can keep (_narrowed): every step of nucleus_pick then reads a few dozen columns
# instead of all of them. Orpheus's 4,097 are left whole, as they were.
NARROW_FROM_COLUMNS = 8192
# How far below the exact limit the cut is taken, relative to the logits' size: far
# above float32 rounding (1e-7), far below any gap a probability rule resolves.
_NARROW_MARGIN = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    """Resolved sampling parameters of one request: what the sampler reads. How many
    tokens to generate is the engine's (GenerationRequest.token_budget), not here."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.1
    seed: int = 0

    def __post_init__(self) -> None:
        problems = sampling_problems(lambda name: getattr(self, name, None))
        if problems:
            raise ValueError("; ".join(problems))


class SequenceSampler:
    """Per-request sampling state: its own random generator and the counts of the
    tokens it generated (for the repetition penalty)."""

    __slots__ = ("params", "rng", "seen")

    def __init__(self, params: SamplingParams, family: SpeechFamily = orpheus.FAMILY) -> None:
        self.params = params
        self.rng = np.random.Generator(np.random.PCG64(params.seed))
        # seen[p, c]: code c was generated at frame position p; the penalty applies to
        # generated tokens, and a token id is (position, code).
        self.seen = np.zeros((family.codes_per_frame, family.codebook_size), dtype=bool)

    def record(self, position: int, code: int) -> None:
        self.seen[position, code] = True


def gather_legal_logits(
    rows: list[np.ndarray], positions: np.ndarray, family: SpeechFamily = orpheus.FAMILY
) -> np.ndarray:
    """(n, codebook + 1) float32 (4097 for Orpheus): from each full-vocabulary row, the
    code columns legal at its frame position, then end of speech."""
    codes = family.codebook_size
    out = np.empty((len(rows), codes + 1), dtype=np.float32)
    for i, (row, position) in enumerate(zip(rows, positions.tolist())):
        first, end = family.code_token_range(position)
        out[i, :codes] = row[first:end]
        out[i, codes] = row[family.end_of_speech]
    return out


def sample(
    legal: np.ndarray,
    samplers: list[SequenceSampler],
    positions: np.ndarray,
    eos_allowed: np.ndarray,
) -> np.ndarray:
    """Picks one column per row: a code, or the last column (end of speech).

    `legal` is modified in place. Each row uses only its own parameters and random
    generator, so a request samples the same tokens whatever else is in the batch.
    """
    n = legal.shape[0]
    with np.errstate(over="ignore"):  # a penalty may push a huge logit past float32: made finite below
        for i, sampler in enumerate(samplers):
            penalty = sampler.params.repetition_penalty
            if penalty != 1.0:
                # Only the columns this request generated at this position: a few dozen, not 4096.
                cols = np.flatnonzero(sampler.seen[positions[i]])
                values = legal[i, cols]
                legal[i, cols] = np.where(values > 0, values / penalty, values * penalty)
    make_finite(legal)
    legal[~eos_allowed, -1] = -np.inf
    # A row with nothing possible (a model that emitted NaN or -inf everywhere) samples
    # its codes uniformly: the frame stays legal and the request ends at its budget.
    dead = legal.max(axis=1) == -np.inf
    if dead.any():
        legal[dead, :-1] = 0.0

    choice = np.empty(n, dtype=np.int64)
    temps = np.array([s.params.temperature for s in samplers], dtype=np.float32)
    greedy = temps <= 0.0
    if greedy.any():
        choice[greedy] = np.argmax(legal[greedy], axis=1)
    idx = np.nonzero(~greedy)[0]
    if idx.size == 0:
        return choice
    params = [samplers[i].params for i in idx]
    # Each request's generator advances once a step, whatever else is in the batch.
    draws = np.array([samplers[i].rng.random() for i in idx], dtype=np.float32)
    rows = legal if idx.size == n else legal[idx]  # nucleus_pick only reads it
    args = (
        temps[idx],
        np.array([p.top_k for p in params]),
        np.array([p.min_p for p in params], dtype=np.float32),
        np.array([p.top_p for p in params], dtype=np.float32),
        draws,
    )
    narrowed = _narrowed(rows, *args[:3]) if rows.shape[1] >= NARROW_FROM_COLUMNS else None
    if narrowed is None:
        choice[idx] = nucleus_pick(rows, *args)
    else:
        candidates, columns = narrowed
        picks = nucleus_pick(candidates, *args)
        choice[idx] = columns[np.arange(len(picks)), picks]
    return choice


def _narrowed(
    rows: np.ndarray, temps: np.ndarray, top_k: np.ndarray, min_p: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Each row cut to the columns top-k or min-p may leave a probability, in column
    order and padded with -inf, and their column numbers; None when a row keeps every
    column (it uses neither).

    nucleus_pick then applies the same rules to the candidates and gives the same pick
    as on the whole row: every column it would keep is a candidate (the best one
    included, so every log probability is the same), columns it would zero are absent
    or zero here too, and a zero adds nothing to a bucket's mass or to a draw. The cut
    is taken a margin below the exact limit so that float rounding cannot leave out a
    column the exact rule keeps; the exact rule then drops the extra ones.
    """
    n_rows, n_cols = rows.shape
    best = rows.max(axis=1)
    floors = np.empty(n_rows, dtype=np.float32)
    for r in range(n_rows):
        floor = -np.inf
        if 0 < top_k[r] < n_cols:
            floor = float(np.partition(rows[r], n_cols - top_k[r])[n_cols - top_k[r]])  # the k-th largest logit
        if min_p[r] > 0.0:
            # p >= min_p  <=>  (logit - best) / T >= ln(min_p)
            floor = max(floor, float(best[r]) + float(max(temps[r], _SMALLEST_TEMPERATURE)) * float(np.log(min_p[r])))
        if not np.isfinite(floor):
            return None
        floors[r] = floor - _NARROW_MARGIN * (1.0 + abs(floor) + abs(float(best[r])))
    keep = rows >= floors[:, None]
    counts = keep.sum(axis=1)
    width = int(counts.max())
    candidates = np.full((n_rows, width), -np.inf, dtype=np.float32)
    columns = np.zeros((n_rows, width), dtype=np.int64)
    for r in range(n_rows):
        cols = np.flatnonzero(keep[r])
        candidates[r, : cols.size] = rows[r, cols]
        columns[r, : cols.size] = cols
    return candidates, columns


def make_finite(legal: np.ndarray) -> None:
    """In place: NaN logits become impossible (-inf), +inf the largest float32, so that
    every later step works on ordered numbers (a NaN once reached np.bincount as a
    negative bucket). Two calls rather than np.nan_to_num's ten: right after a decode
    the sampler runs on cold caches, where each numpy call costs (docs/benchmarks.md)."""
    np.copyto(legal, -np.inf, where=np.isnan(legal))
    np.minimum(legal, _FLOAT32_MAX, out=legal)  # +inf; -inf and finite values stay


def nucleus_pick(
    rows: np.ndarray, temps: np.ndarray, top_k: np.ndarray, min_p: np.ndarray, top_p: np.ndarray, draws: np.ndarray
) -> np.ndarray:
    """Temperature, top-k, min-p and top-p over each row, then a pick by `draws` (uniform in [0, 1)).

    Top-p keeps every column whose probability is at least that of the last column
    the sorted cumulative mass needs to reach top_p. Sorting 4097 columns a row (and
    a cumulative sum over them) cost more than the demo model's whole decode step, so
    the threshold is found without a full sort: columns are bucketed by log
    probability, one bincount gives each bucket's mass, the bucket where the mass
    crosses top_p is found from the buckets' cumulative mass, and only that bucket's
    few columns are sorted. The draw walks buckets (best first), then columns in
    index order inside the chosen bucket: a different order than a sorted walk, the
    same distribution.
    """
    n_rows, n_cols = rows.shape
    # Shift before scaling: every log probability is then <= 0 with the best at
    # exactly 0 whatever the temperature, so nothing overflows towards +inf and the
    # best column always survives min-p and top-p. Overflow towards -inf (a tiny
    # temperature) is a probability of 0, as it should be.
    with np.errstate(over="ignore", under="ignore"):
        logp = rows - rows.max(axis=1, keepdims=True)
        logp /= np.maximum(temps, _SMALLEST_TEMPERATURE)[:, None]
        probs = np.exp(logp)
        # Bucket b holds log probabilities in (-(b+1)/S, -b/S]; the last takes the tail.
        bucket = np.minimum(-logp * _BUCKETS_PER_NAT, _N_BUCKETS - 1).astype(np.int64)
    if top_k.any():
        for k in np.nonzero((top_k > 0) & (top_k < n_cols))[0]:
            kth = np.partition(probs[k], -top_k[k])[-top_k[k]]
            probs[k][probs[k] < kth] = 0.0
    if min_p.any():  # probabilities are never below a min_p of 0
        probs[probs < min_p[:, None]] = 0.0
    flat = bucket + (np.arange(n_rows) * _N_BUCKETS)[:, None]
    mass = np.bincount(flat.ravel(), weights=probs.ravel(), minlength=n_rows * _N_BUCKETS).reshape(n_rows, -1)
    cum = np.cumsum(mass, axis=1)
    picks = np.empty(n_rows, dtype=np.int64)
    for r in range(n_rows):
        total = cum[r, -1]
        target = top_p[r] * total
        edge = min(int(np.searchsorted(cum[r], target, side="left")), _N_BUCKETS - 1)
        before = cum[r, edge - 1] if edge else 0.0
        # Exact cut inside the edge bucket: its columns, best first.
        cols = np.nonzero(bucket[r] == edge)[0]
        values = np.sort(probs[r, cols])[::-1]
        need = np.searchsorted(np.cumsum(values) + before, target, side="left")
        threshold = values[min(int(need), len(values) - 1)] if len(values) else 0.0
        kept_edge = values[values >= threshold].sum()
        # The draw: buckets above the edge in full, then the kept part of the edge.
        u = draws[r] * (before + kept_edge)
        chosen = min(int(np.searchsorted(cum[r, :edge], u, side="right")), edge)
        if chosen < edge:
            cols = np.nonzero(bucket[r] == chosen)[0]
            weights = probs[r, cols]
            u -= cum[r, chosen - 1] if chosen else 0.0
        else:
            weights = np.where(probs[r, cols] >= threshold, probs[r, cols], 0.0)
            u -= before
        picks[r] = cols[_draw_within(weights, u)]
    return picks


def _draw_within(weights: np.ndarray, u: float) -> int:
    """Index of the column whose share of the cumulative weight holds `u`; never one
    of weight 0 (rounding can put `u` at or past the total)."""
    i = int(np.searchsorted(np.cumsum(weights), u, side="right"))
    if i >= len(weights) or weights[i] <= 0:
        i = int(np.flatnonzero(weights)[-1])
    return i
