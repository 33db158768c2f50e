"""OpenMP idle-thread policy side by side (issue 22): one process of the comparison.

`python benchmarks/omp_wait_policy.py llama|torch THREADS SECONDS` runs a llama.cpp
decode loop (the demo GGUF, 4 sequences a step) or a torch conv stack with THREADS
threads for SECONDS and prints steps per second. docs/benchmarks.md runs it alone and
four at once, with OMP_WAIT_POLICY unset and PASSIVE: a comparison of ratios on one
machine, not absolute figures.
"""
import sys
import time
from pathlib import Path

kind, threads, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
GGUF = Path(__file__).resolve().parents[1] / "models/demo/backbone.gguf"
if kind == "llama":
    from chorus.speech import orpheus
    from services.token_server.llama_backend import LlamaBackbone, TokenBatch
    bb = LlamaBackbone(str(GGUF), n_ctx=4 * 2048, n_batch=64, n_seq_max=4, threads=threads)
    batch = TokenBatch(64, 4)
    prompt = orpheus.wrap_prompt([orpheus.BOS] + [1] * 8)
    for s in range(4):
        batch.clear(); batch.add(prompt, 0, s, True); bb.decode(batch)
    pos = len(prompt); steps = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        batch.clear()
        for s in range(4):
            batch.add([orpheus.AUDIO_TOKEN_BASE], pos, s, True)
        bb.decode(batch); pos += 1; steps += 1
        if pos > 1900:
            for s in range(4):
                bb.clear_sequence(s)
                batch.clear(); batch.add(prompt, 0, s, True); bb.decode(batch)
            pos = len(prompt)
else:
    import torch
    torch.set_num_threads(threads)
    net = torch.nn.Sequential(*[torch.nn.Conv1d(256, 256, 7, padding=3) for _ in range(6)]).eval()
    x = torch.randn(4, 256, 32); steps = 0
    end = time.perf_counter() + seconds
    with torch.no_grad():
        while time.perf_counter() < end:
            net(x); steps += 1
print(kind, steps / seconds)
