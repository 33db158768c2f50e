"""The smoke check: load a backbone and decode, in a child process, and explain a death.

A CPU backend built for instructions this CPU does not run loads fine and dies on
the first matmul, so the check decodes: a prompt (the batched kernels) and then one
token (the single-row kernels), on 2 threads (llama.cpp's worker threads are where
VMs have refused AMX). In a child, because the failure is a signal, not an exception.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tools.llama_wheel import cpu

SMOKE_TIMEOUT_S = 300

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "tara: The smoke check decodes a prompt and one token."
N_BATCH = 64


def decode_once(gguf: Path, threads: int, stage: Callable[[str], None] = lambda name: None) -> dict:
    """In the child: load GGUF, decode a prompt, then the token it picks; the figures.
    `stage` hears each step before it runs, so a caller can say where a crash happened."""
    import numpy as np

    from services.token_server.llama_backend import LlamaBackbone, TokenBatch

    stage("loading the model")
    started = time.perf_counter()
    backbone = LlamaBackbone(Path(gguf), n_ctx=256, n_batch=N_BATCH, n_seq_max=1, threads=threads)
    figures = {"load_s": time.perf_counter() - started, "threads": threads}
    batch = TokenBatch(N_BATCH, 1)
    try:
        tokens = backbone.tokenize(PROMPT)[:N_BATCH]
        last = batch.add(tokens, 0, 0, want_last_logits=True)
        stage("prompt decode")
        started = time.perf_counter()
        backbone.decode(batch)
        figures.update(prompt_tokens=len(tokens), prompt_s=time.perf_counter() - started)
        next_token = int(np.argmax(backbone.logits_at(last)))
        stage("single-token decode")
        batch.clear()
        last = batch.add([next_token], len(tokens), 0, want_last_logits=True)
        started = time.perf_counter()
        backbone.decode(batch)
        figures["step_s"] = time.perf_counter() - started
        figures["finite_logits"] = bool(np.isfinite(backbone.logits_at(last)).all())
        return figures
    finally:
        batch.free()
        backbone.close()


SIGNAL_MEANING = {
    signal.SIGILL: "illegal instruction: the library ran an instruction this CPU, or its hypervisor, does not allow",
    signal.SIGSEGV: "segmentation fault: the library read or wrote memory it does not own",
    signal.SIGBUS: "bus error: a misaligned or unmapped memory access",
    signal.SIGFPE: "arithmetic exception",
    signal.SIGABRT: "abort: the library stopped itself on a failed check",
}


@dataclass(frozen=True)
class SmokeResult:
    returncode: int
    output: str
    figures: dict | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.figures is not None and self.figures.get("finite_logits", False)

    @property
    def signal(self) -> signal.Signals | None:
        if self.returncode < 0:
            try:
                return signal.Signals(-self.returncode)
            except ValueError:
                return None
        return None


def smoke_command(gguf: Path, python: str = sys.executable) -> list[str]:
    return [python, "-m", "tools.llama_wheel.smoke", str(gguf)]


def run_smoke(command: list[str], cwd: Path = ROOT, timeout_s: float = SMOKE_TIMEOUT_S) -> SmokeResult:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        return SmokeResult(124, f"no answer after {timeout_s:.0f}s: {err}")
    figures = None
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        try:
            figures = json.loads(lines[-1])
        except ValueError:
            figures = None
    return SmokeResult(done.returncode, (done.stdout + done.stderr)[-4000:], figures)


def signal_text(sig: signal.Signals) -> str:
    return f"{sig.name} ({SIGNAL_MEANING.get(sig, 'killed by a signal')})"


def describe_death(what: str, sig: signal.Signals, record: dict | None, when: str = "") -> str:
    """One paragraph: what crashed, on which CPU, built for what, and which flags to suspect."""
    model, flags = cpu.cpu_model(), cpu.cpu_flags()
    parts = [f"{what} died of {signal_text(sig)}{when}."]
    built_for = {cpu.same_feature(name) for name in (record or {}).get("instruction_sets", [])}
    if record:
        relevant = [f for f in cpu.RELEVANT_FLAGS if cpu.same_feature(f) in built_for]
        parts.append(
            f"That library is llama.cpp's CPU backend (libggml-cpu.so) from the {record.get('flavour', '?')} build "
            f"of llama-cpp-python {record.get('llama_cpp_python', '?')}, built on {record.get('cpu_model', '?')} "
            f"with {', '.join(relevant) or 'no instruction set beyond x86-64'}; this CPU is {model}."
        )
    else:
        parts.append(f"The llama.cpp library was not built by Chorus's setup (no build record); this CPU is {model}.")
    if sig == signal.SIGILL:
        advertised_amx = sorted(f for f in flags if f.startswith("amx"))
        if advertised_amx:
            parts.append(
                f"This CPU advertises AMX ({', '.join(advertised_amx)}), which some hypervisors advertise but do not "
                "let threads run: a build that contains AMX kernels dies on the first matmul."
            )
        advertised = {cpu.same_feature(f) for f in flags}
        missing = [f for f in cpu.RELEVANT_FLAGS if cpu.same_feature(f) in built_for - advertised]
        if missing:
            parts.append(f"The build uses {', '.join(missing)}, which this CPU does not advertise.")
    return " ".join(parts)


if __name__ == "__main__":
    # On 2 threads: llama.cpp's worker threads are where VMs have refused AMX.
    print(json.dumps(decode_once(Path(sys.argv[1]), threads=2)))
