"""Frame-legal sampling, vectorized across the slots of one engine step.

The backbone may only emit, at frame position p, one of the 4096 audio tokens of
that position, or end of speech at a frame boundary once a frame exists. Restricting
the logits to those 4097 columns before sampling means every frame decodes, and
makes sampling cheap (4097 columns instead of 156,940). All slots of a step are
sampled together in numpy so that the Python around llama_decode stays small.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass

import numpy as np

from chorus import orpheus

N_CODES = orpheus.CODEBOOK_SIZE
# From this many sampled rows on, a step's sampling is split over two threads.
PARALLEL_ROWS = 8
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sampler")
EOS_COLUMN = N_CODES  # column of END_OF_SPEECH in a gathered row


@dataclass(frozen=True)
class SamplingParams:
    """Resolved sampling parameters of one request."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.1
    max_tokens: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.temperature <= 2.0:
            problems.append(f"temperature must be in 0..2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= N_CODES:
            problems.append(f"top_k must be in 0..{N_CODES}, got {self.top_k}")
        if not 0.0 <= self.min_p < 1.0:
            problems.append(f"min_p must be in [0, 1), got {self.min_p}")
        if not 0.5 <= self.repetition_penalty <= 2.0:
            problems.append(f"repetition_penalty must be in 0.5..2, got {self.repetition_penalty}")
        if self.max_tokens < 0:
            problems.append(f"max_tokens must be >= 0, got {self.max_tokens}")
        if problems:
            raise ValueError("; ".join(problems))


class SequenceSampler:
    """Per-request sampling state: its own random generator and the counts of the
    tokens it generated (for the repetition penalty)."""

    __slots__ = ("params", "rng", "seen")

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.Generator(np.random.PCG64(params.seed))
        # seen[p, c]: code c was generated at frame position p; the penalty applies to
        # generated tokens, and a token id is (position, code).
        self.seen = np.zeros((orpheus.CODES_PER_FRAME, N_CODES), dtype=bool)

    def record(self, position: int, code: int) -> None:
        self.seen[position, code] = True


def gather_legal_logits(rows: list[np.ndarray], positions: np.ndarray) -> np.ndarray:
    """(n, 4097) float32: from each full-vocabulary row, the audio columns legal at its
    frame position, then EOS."""
    starts = orpheus.AUDIO_TOKEN_BASE + positions * N_CODES
    out = np.empty((len(rows), N_CODES + 1), dtype=np.float32)
    for i, (row, start) in enumerate(zip(rows, starts)):
        out[i, :N_CODES] = row[start : start + N_CODES]
        out[i, EOS_COLUMN] = row[orpheus.END_OF_SPEECH]
    return out


def sample(
    legal: np.ndarray,
    samplers: list[SequenceSampler],
    positions: np.ndarray,
    eos_allowed: np.ndarray,
) -> np.ndarray:
    """Picks one column per row: a code (0..4095) or EOS_COLUMN.

    `legal` is modified in place. Each row uses only its own parameters and random
    generator, so a request samples the same tokens whatever else is in the batch.
    """
    n = legal.shape[0]
    legal[~eos_allowed, EOS_COLUMN] = -np.inf
    penalties = np.array([s.params.repetition_penalty for s in samplers], dtype=np.float32)
    if np.any(penalties != 1.0):
        seen = np.zeros_like(legal, dtype=bool)
        for i, s in enumerate(samplers):
            seen[i, :N_CODES] = s.seen[positions[i]]
        pen = np.broadcast_to(penalties[:, None], legal.shape)
        penalized = np.where(legal > 0, legal / pen, legal * pen)
        np.copyto(legal, penalized, where=seen)

    choice = np.empty(n, dtype=np.int64)
    temps = np.array([s.params.temperature for s in samplers], dtype=np.float32)
    greedy = temps <= 0.0
    if greedy.any():
        choice[greedy] = np.argmax(legal[greedy], axis=1)
    idx = np.nonzero(~greedy)[0]
    if idx.size == 0:
        return choice
    params = [samplers[i].params for i in idx]
    # Draws first, in row order: each request's generator advances once a step,
    # whatever else is in the batch and however the rows are split below.
    draws = np.array([samplers[i].rng.random() for i in idx], dtype=np.float32)
    rows = legal[idx]
    args = (
        temps[idx],
        np.array([p.top_k for p in params]),
        np.array([p.min_p for p in params], dtype=np.float32),
        np.array([p.top_p for p in params], dtype=np.float32),
        draws,
    )
    if idx.size < PARALLEL_ROWS:
        choice[idx] = nucleus_pick(rows, *args)
    else:
        # llama.cpp is idle while we sample, so its cores are free; numpy releases
        # the GIL in sort/cumsum, and rows are independent.
        half = idx.size // 2
        parts = [slice(0, half), slice(half, None)]
        futures = [_POOL.submit(nucleus_pick, rows[p], *(a[p] for a in args)) for p in parts]
        choice[idx] = np.concatenate([f.result() for f in futures])
    return choice


def nucleus_pick(
    rows: np.ndarray, temps: np.ndarray, top_k: np.ndarray, min_p: np.ndarray, top_p: np.ndarray, draws: np.ndarray
) -> np.ndarray:
    """Temperature, top-k, min-p and top-p over each row, then a pick by `draws` (uniform in [0, 1))."""
    # Probabilities relative to the best column (which gets exactly 1).
    rows = rows / temps[:, None]
    rows -= rows.max(axis=1, keepdims=True)
    probs = np.exp(rows)
    for k in np.nonzero((top_k > 0) & (top_k < probs.shape[1]))[0]:
        kth = np.partition(probs[k], -top_k[k])[-top_k[k]]
        probs[k][probs[k] < kth] = 0.0
    probs[probs < min_p[:, None]] = 0.0
    # Nucleus: the smallest set of best columns holding top_p of the mass. Sorting
    # values (not indices) finds its threshold; the draw below then runs in column
    # order, which samples the same distribution without an argsort (4 ms a step at
    # 16 slots, more than the decode itself on the demo model).
    descending = np.sort(probs, axis=1)[:, ::-1]
    mass = np.cumsum(descending, axis=1)
    last = np.minimum((mass < top_p[:, None] * mass[:, -1:]).sum(axis=1), probs.shape[1] - 1)
    threshold = descending[np.arange(len(rows)), last]
    probs[probs < threshold[:, None]] = 0.0
    cum = np.cumsum(probs, axis=1)
    return np.minimum((cum <= (draws * cum[:, -1])[:, None]).sum(axis=1), probs.shape[1] - 1)
