"""Gateway configuration: typed and checked once, set from flags/env only in __main__."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from chorus.realtime.playback import DEFAULT_START_BUFFER_S
from chorus.rpc.stall import GATEWAY_STALL, StallPolicy
from chorus.security.access import MAX_REQUEST_BYTES
from chorus.security.tls import DEFAULT_ALLOWED_CLIENTS, TlsFiles
from chorus.speech import orpheus
from chorus.speech.limits import MAX_REFERENCE_UPLOAD_BYTES
from chorus.speech.voice_store import VoiceStore, VoiceStoreError
from chorus.speech.voices import ORPHEUS_VOICES, description, voice_problems
from chorus.telemetry.tiers import GATEWAY

# An origin as browsers send it: scheme, host and port, nothing after.
_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?")


@dataclass(frozen=True)
class GatewayConfig:
    # host:port of each token server; requests go to the least loaded.
    token_servers: tuple[str, ...]
    host: str = "127.0.0.1"
    # Longest text one Synthesize call accepts, and the longest text message of a
    # StreamingSynthesize call.
    max_text_chars: int = 20_000
    voices: tuple[str, ...] = tuple(ORPHEUS_VOICES)
    default_voice: str = orpheus.DEFAULT_VOICE
    # Voices registered from reference audio (chorus.speech.voice_store), spoken by the
    # token servers of the family each was registered for; None: the fixed voices only.
    voice_store: Path | None = None
    # Most voices the store may hold: every distinct Riva zero-shot prompt registers one,
    # so without a bound any client could fill the volume.
    max_voices: int = 1000
    # Pieces of a long text are packed up to this many characters (about 15 s of
    # speech, some 1,300 tokens: well inside a slot's context).
    segment_target_chars: int = 240
    # Generations running ahead of the one being relayed. One is enough while the
    # backbone is faster than real time; more only adds work that a client who
    # hangs up throws away.
    lookahead_segments: int = 1
    # Deadline for calls that set none: a client that forgets one must not hold a
    # slot forever.
    request_deadline_s: float = 600.0
    # How often token servers are asked for their load.
    status_interval_s: float = 0.25
    # When a token server that sends no audio mid-stream is taken for hung and the
    # stream replayed elsewhere (chorus.rpc.stall; validated there).
    stall: StallPolicy = GATEWAY_STALL
    # Audio a listener buffers before playback starts: the playback clock that
    # underruns are counted against, passed on to the token servers and codec workers.
    start_buffer_s: float = DEFAULT_START_BUFFER_S
    # The HTTP port (OpenAI's speech endpoint, the browser page, /health), on `host`;
    # 0 picks a free one, None serves no HTTP.
    http_port: int | None = None
    # Seconds the HTTP port waits for a request's headers (on a new connection, or
    # the next request on a kept-alive one) and for its whole body: a client that
    # sends slowly or not at all (slowloris, a half-sent body) must not hold a
    # connection and a task forever.
    http_read_timeout_s: float = 15.0
    # Origins (`https://app.example.com`) whose pages may call the HTTP port from a
    # browser (CORS); empty: only the page the gateway serves itself.
    cors_origins: tuple[str, ...] = ()
    # PEM files for TLS on the client ports (gRPC and HTTP) and mTLS to token servers;
    # off when None.
    tls: TlsFiles | None = None
    # Client certificate identities the client port requires; empty: no client
    # certificates (clients authenticate with API keys).
    allowed_clients: tuple[str, ...] = DEFAULT_ALLOWED_CLIENTS[GATEWAY]
    # `<key id>:<secret>` lines (chorus.security.api_keys); every call but health and
    # reflection then needs a key. Off when None.
    api_keys_file: Path | None = None
    # Most synthesis streams one client address, and one API key, may hold at once
    # (0: no limit). Behind a proxy that hides client addresses, raise the first.
    max_streams_per_client: int = 64
    max_streams_per_key: int = 64

    def __post_init__(self) -> None:
        servers = tuple(s.strip() for s in self.token_servers if s and s.strip())
        object.__setattr__(self, "token_servers", servers)
        object.__setattr__(self, "voices", tuple(self.voices))
        if self.voice_store is not None:
            object.__setattr__(self, "voice_store", Path(self.voice_store))
        problems = []
        if not servers:
            problems.append("at least one token server address is needed (--token-servers host:port[,host:port])")
        for address in servers:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                problems.append(f"token server address {address!r} must be host:port")
        if len(set(servers)) != len(servers):
            problems.append(f"token server addresses repeat: {', '.join(servers)}")
        if not 1 <= self.max_text_chars <= 1_000_000:
            problems.append(f"max_text_chars must be 1..1000000, got {self.max_text_chars}")
        problems += voice_problems(self.voices)
        if self.default_voice not in self.voices:
            problems.append(f"default voice {self.default_voice!r} is not among the voices {list(self.voices)}")
        if not 16 <= self.segment_target_chars <= 4000:
            problems.append(f"segment_target_chars must be 16..4000, got {self.segment_target_chars}")
        if not 0 <= self.lookahead_segments <= 8:
            problems.append(f"lookahead_segments must be 0..8, got {self.lookahead_segments}")
        if self.request_deadline_s <= 0:
            problems.append(f"request_deadline_s must be positive, got {self.request_deadline_s}")
        if not 0.0 <= self.start_buffer_s <= 60.0:
            problems.append(f"start_buffer_s must be in [0, 60], got {self.start_buffer_s}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            problems.append(f"http_port must be 0..65535 (or off), got {self.http_port}")
        if not 0 < self.http_read_timeout_s <= 3600:
            problems.append(f"http_read_timeout_s must be in (0, 3600], got {self.http_read_timeout_s}")
        if self.status_interval_s <= 0:
            problems.append(f"status_interval_s must be positive, got {self.status_interval_s}")
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        for origin in self.cors_origins:
            if not _ORIGIN.fullmatch(origin):
                problems.append(f"CORS origin {origin!r} must be scheme://host[:port] (http or https, no path or "
                                "trailing slash), e.g. https://app.example.com; list each origin, * is not taken")
        object.__setattr__(self, "allowed_clients", tuple(self.allowed_clients))
        if self.allowed_clients and self.tls is None:
            problems.append("allowed_clients needs TLS (--tls-cert, --tls-key, --tls-ca)")
        if self.api_keys_file is not None:
            object.__setattr__(self, "api_keys_file", Path(self.api_keys_file))
        if self.max_voices < 1:
            problems.append(f"max_voices must be at least 1, got {self.max_voices}")
        for name in ("max_streams_per_client", "max_streams_per_key"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid gateway config: " + "; ".join(problems))

    @property
    def max_request_bytes(self) -> int:
        """The largest request message the client port reads: the longest text in
        UTF-8 (up to 4 bytes a character) and room for the rest, at least 1 MiB; with
        a voice store, also the largest reference recording a registration uploads
        (in base64 on the HTTP port, 4 bytes for every 3)."""
        largest = max(MAX_REQUEST_BYTES, 4 * self.max_text_chars + 64 * 1024)
        if self.voice_store is not None:
            largest = max(largest, MAX_REFERENCE_UPLOAD_BYTES * 4 // 3 + 64 * 1024)
        return largest

    def listed_voices(self) -> list[tuple[str, str]]:
        """(name, description) of every voice, the default first (as ListVoices
        promises), then the voices of the voice store with their family."""
        names = [self.default_voice, *(v for v in self.voices if v != self.default_voice)]
        listed = [(name, description(name)) for name in names]
        if self.voice_store is not None:
            store = VoiceStore(self.voice_store)
            for name in store.names():
                if name in self.voices:
                    continue  # the fixed voice of that name is the one spoken
                try:
                    listed.append((name, store_voice_description(store.family_of(name))))
                except VoiceStoreError:
                    continue  # unreadable: not offered (a request naming it is told why)
        return listed


def store_voice_description(family: str) -> str:
    """How ListVoices and /v1/audio/voices describe a voice of the store."""
    return f"registered from reference audio ({family})"
