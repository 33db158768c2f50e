"""Token server configuration: typed, validated once, set from flags/env only in __main__."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from chorus.realtime.cpu_budget import cpu_budget
from chorus.security.tls import DEFAULT_ALLOWED_CLIENTS, TlsFiles
from chorus.speech.orpheus import DEFAULT_BUDGET_HEADROOM
from chorus.speech.phonemes import DEFAULT_LANGUAGE
from chorus.speech.voices import ORPHEUS_VOICES, voice_problems
from chorus.telemetry.tiers import TOKEN_SERVER


def default_llama_threads() -> int:
    """Every CPU this process may use (affinity and cgroup quota): alone in its
    container, the backbone is the work. `chorus serve` passes a share instead."""
    return cpu_budget().threads


def default_slots() -> int:
    """Enough slots that real-time capacity, not slots, limits admission: decode steps
    are memory-bound, so batching more sequences is nearly free until the cores
    saturate (16 sequences ran at ~4x the tokens/s of one on 2 cores)."""
    return max(8, 4 * cpu_budget().threads)


@dataclass(frozen=True)
class TokenServerConfig:
    model_path: Path
    codec_workers: tuple[str, ...] = ()
    slots: int = field(default_factory=default_slots)
    ctx_per_slot: int = 4096
    n_batch: int = 512
    llama_threads: int = field(default_factory=default_llama_threads)
    queue_size: int = 32
    host: str = "127.0.0.1"
    # Headroom of the generation budget over ~6 tokens a character, for requests that
    # set no max_tokens (see chorus.speech.orpheus.default_max_tokens).
    budget_headroom: float = DEFAULT_BUDGET_HEADROOM
    # A stream this far ahead of its listener (seconds of audio) sits steps out while
    # others need them; None never paces.
    pace_lead_s: float | None = 2.0
    # Real-time capacity keeps this fraction of spare speed per stream.
    capacity_margin: float = 0.15
    # Admit by real-time capacity (False: by slots only, capacity still measured).
    realtime_admission: bool = True
    # Measure every batch size once at start, so admission knows the machine.
    calibrate: bool = True
    # Layers llama.cpp offloads to the GPU: 0 keeps everything on the CPU (and the
    # batch-invariance measured there); -1 offloads every layer. Needs a CUDA build
    # of llama-cpp-python (the CUDA image); a CPU build ignores it.
    gpu_layers: int = 0
    # PEM files for TLS: with them the server requires a client certificate naming one
    # of allowed_clients, and calls codec workers over mTLS as chorus-token-server.
    tls: TlsFiles | None = None
    allowed_clients: tuple[str, ...] = DEFAULT_ALLOWED_CLIENTS[TOKEN_SERVER]
    # Most Generate streams one client (a gateway) may hold; 0: no limit (the queue
    # already bounds what waits).
    max_streams_per_client: int = 0
    # Voices a request may name, the default (for requests that name none) first.
    voices: tuple[str, ...] = tuple(ORPHEUS_VOICES)
    # Voices registered from reference audio (chorus.speech.voice_store), what a NeuTTS
    # backbone speaks; None: none (an Orpheus backbone needs none).
    voice_store: Path | None = None
    # espeak-ng's language for the text, for a backbone that reads phonemes (NeuTTS-Air).
    phoneme_language: str = DEFAULT_LANGUAGE

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_path", Path(self.model_path))
        object.__setattr__(self, "codec_workers", tuple(w for w in self.codec_workers if w))
        object.__setattr__(self, "voices", tuple(self.voices))
        if self.voice_store is not None:
            object.__setattr__(self, "voice_store", Path(self.voice_store))
        problems = []
        if not self.model_path.is_file():
            problems.append(f"model file {self.model_path} does not exist (build one with `chorus models demo`)")
        if not 1 <= self.slots <= 256:
            problems.append(f"slots must be 1..256, got {self.slots}")
        if self.ctx_per_slot < 256:
            problems.append(f"ctx_per_slot must be at least 256, got {self.ctx_per_slot}")
        if not self.slots <= self.n_batch <= 8192:
            problems.append(f"n_batch must be between slots ({self.slots}) and 8192, got {self.n_batch}")
        if not 1 <= self.llama_threads <= 1024:
            problems.append(f"llama_threads must be 1..1024, got {self.llama_threads}")
        if self.queue_size < 0:
            problems.append(f"queue_size must be >= 0, got {self.queue_size}")
        if self.gpu_layers < -1:
            problems.append(f"gpu_layers must be -1 (all), 0 (none) or a layer count, got {self.gpu_layers}")
        if not 0 < self.budget_headroom <= 100:
            problems.append(f"budget_headroom must be in (0, 100], got {self.budget_headroom}")
        if self.pace_lead_s is not None and not 0.0 < self.pace_lead_s <= 3600.0:
            problems.append(f"pace_lead_s must be in (0, 3600] seconds, got {self.pace_lead_s}")
        if not 0.0 <= self.capacity_margin <= 10.0:
            problems.append(f"capacity_margin must be in [0, 10], got {self.capacity_margin}")
        object.__setattr__(self, "allowed_clients", tuple(self.allowed_clients))
        if self.tls is not None and not self.allowed_clients:
            problems.append("with TLS, allowed_clients must name who may call (e.g. chorus-gateway)")
        if self.max_streams_per_client < 0:
            problems.append(f"max_streams_per_client must be >= 0, got {self.max_streams_per_client}")
        problems += voice_problems(self.voices)
        for worker in self.codec_workers:
            if ":" not in worker:
                problems.append(f"codec worker address {worker!r} must be host:port")
        if self.voice_store is not None and self.voice_store.exists() and not self.voice_store.is_dir():
            problems.append(f"voice store {self.voice_store} is not a folder")
        if problems:
            raise ValueError("invalid token server config: " + "; ".join(problems))
