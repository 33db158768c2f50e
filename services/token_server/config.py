"""Token server configuration: typed, validated once, set from flags/env only in __main__."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from chorus.telemetry import TOKEN_SERVER
from chorus.tls import DEFAULT_ALLOWED_CLIENTS, TlsFiles


def default_slots() -> int:
    """Four slots a core: decode steps are memory-bound, so batching more sequences
    is nearly free until the cores saturate (DESIGN.md measured 16 sequences at ~4x
    the tokens/s of one on 2 cores)."""
    return max(4, 4 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class TokenServerConfig:
    model_path: Path
    codec_workers: tuple[str, ...] = ()
    slots: int = field(default_factory=default_slots)
    ctx_per_slot: int = 4096
    n_batch: int = 512
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    queue_size: int = 32
    host: str = "127.0.0.1"
    # Headroom of the generation budget over ~6 tokens a character, for requests that
    # set no max_tokens (see chorus.orpheus.default_max_tokens).
    budget_headroom: float = 1.5
    # PEM files for TLS: with them the server requires a client certificate naming one
    # of allowed_clients, and calls codec workers over mTLS as chorus-token-server.
    tls: TlsFiles | None = None
    allowed_clients: tuple[str, ...] = DEFAULT_ALLOWED_CLIENTS[TOKEN_SERVER]
    # Most Generate streams one client (a gateway) may hold; 0: no limit (the queue
    # already bounds what waits).
    max_streams_per_client: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_path", Path(self.model_path))
        object.__setattr__(self, "codec_workers", tuple(w for w in self.codec_workers if w))
        problems = []
        if not self.model_path.is_file():
            problems.append(f"model file {self.model_path} does not exist (build one with `chorus models demo`)")
        if not 1 <= self.slots <= 256:
            problems.append(f"slots must be 1..256, got {self.slots}")
        if self.ctx_per_slot < 256:
            problems.append(f"ctx_per_slot must be at least 256, got {self.ctx_per_slot}")
        if not self.slots <= self.n_batch <= 8192:
            problems.append(f"n_batch must be between slots ({self.slots}) and 8192, got {self.n_batch}")
        if self.threads < 1:
            problems.append(f"threads must be positive, got {self.threads}")
        if self.queue_size < 0:
            problems.append(f"queue_size must be >= 0, got {self.queue_size}")
        if self.budget_headroom <= 0:
            problems.append(f"budget_headroom must be positive, got {self.budget_headroom}")
        object.__setattr__(self, "allowed_clients", tuple(self.allowed_clients))
        if self.tls is not None and not self.allowed_clients:
            problems.append("with TLS, allowed_clients must name who may call (e.g. chorus-gateway)")
        if self.max_streams_per_client < 0:
            problems.append(f"max_streams_per_client must be >= 0, got {self.max_streams_per_client}")
        for worker in self.codec_workers:
            if ":" not in worker:
                problems.append(f"codec worker address {worker!r} must be host:port")
        if problems:
            raise ValueError("invalid token server config: " + "; ".join(problems))
