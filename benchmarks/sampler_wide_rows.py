"""One token's sampling, each family's row width, with and without the cut to candidates.

NeuTTS-Air samples from 65,537 columns a token where Orpheus samples from 4,097, and
its default sampling (top-k 50, min-p 0.05) keeps a few dozen of them; the sampler cuts
a row that wide to those candidates first (services/token_server/sampler.py,
`_narrowed`). This times `gather_legal_logits` + `sample` on one row, the cut on and
off, interleaved in rounds so that both arms see the same machine, and prints the
median per token and the ratio.

    python benchmarks/sampler_wide_rows.py [--tokens 500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import services.token_server.sampler as sampler
from chorus.speech import neutts, orpheus
from services.token_server.sampler import SamplingParams, SequenceSampler, gather_legal_logits, sample

ARMS = {
    "neutts-air": (neutts.family(1000, 999), SamplingParams(temperature=1.0, top_k=50, top_p=0.95, min_p=0.05,
                                                             repetition_penalty=1.0)),
    "orpheus": (orpheus.FAMILY, SamplingParams()),
}


def per_token_ms(family, params, tokens: int, narrow: bool) -> float:
    sampler.NARROW_FROM_COLUMNS = 8192 if narrow else 10**9
    rng = np.random.default_rng(0)
    vocab = family.code_token_base + family.codes_per_frame * family.codebook_size + 10
    row = (rng.standard_normal(vocab) * 3).astype(np.float32)
    samplers = [SequenceSampler(params, family)]
    positions, eos = np.zeros(1, dtype=np.int64), np.ones(1, dtype=bool)
    for _ in range(20):  # warm caches
        sample(gather_legal_logits([row], positions, family), samplers, positions, eos)
    started = time.perf_counter()
    for _ in range(tokens):
        sample(gather_legal_logits([row], positions, family), samplers, positions, eos)
    return (time.perf_counter() - started) / tokens * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=500)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    print("| family | columns | whole row ms/token | cut ms/token | whole / cut |")
    print("|---|---:|---:|---:|---:|")
    for name, (family, params) in ARMS.items():
        whole, cut = [], []
        for _ in range(args.rounds):
            whole.append(per_token_ms(family, params, args.tokens, narrow=False))
            cut.append(per_token_ms(family, params, args.tokens, narrow=True))
        w, c = statistics.median(whole), statistics.median(cut)
        print(f"| {name} | {family.codebook_size + 1:,} | {w:.3f} | {c:.3f} | {w / c:.1f}x |")


if __name__ == "__main__":
    main()
