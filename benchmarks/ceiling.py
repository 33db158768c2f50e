"""The machine's ceiling for streams of speech: bare `llama_decode` beside the streaming
SNAC decoder, over thread splits (tools/bench/ceiling.py says how).

    python benchmarks/ceiling.py [--batches 1,2,4,8] [--seconds 4] [--repeat 3]
        [--decoder-precision auto] [--cpus N] [--oversubscribed] [--json ceiling.json]

`chorus bench --ceiling` measures the same in the same run as its load sweep.
"""

from tools.bench.ceiling import main

if __name__ == "__main__":
    main()
