"""`python -m gateway` / `chorus-gateway`: flags and env to config, then serve."""

from __future__ import annotations

import argparse
import os

from chorus.rpc.entrypoint import add_common_flags, allowed_clients, from_env, parse_flags, run, tls_files
from chorus.rpc.stall import GATEWAY_STALL, StallPolicy
from chorus.speech.voices import VOICES_FLAG_HELP, parse_voices
from chorus.telemetry import tracing
from gateway import metrics
from gateway.config import GatewayConfig

DEFAULT_HTTP_PORT = 8080


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="chorus-gateway", description="Chorus client-facing gRPC gateway")
    p.add_argument("--token-servers", default=env("CHORUS_TOKEN_SERVERS", ""),
                   help="comma-separated host:port of token servers [CHORUS_TOKEN_SERVERS]")
    p.add_argument("--max-text-chars", type=int, default=from_env("CHORUS_MAX_TEXT_CHARS", 20_000))
    p.add_argument("--voices", default=env("CHORUS_VOICES", ""), help=VOICES_FLAG_HELP)
    p.add_argument("--voice-store", default=env("CHORUS_VOICE_STORE"),
                   help="folder of voices registered from reference audio; each is routed to the token servers "
                        "of its model family, and where registered voices are written [CHORUS_VOICE_STORE]")
    p.add_argument("--max-voices", type=int, default=from_env("CHORUS_MAX_VOICES", 1000),
                   help="most voices the voice store holds; registrations past it are refused (Riva zero-shot "
                        "prompts register one each) [CHORUS_MAX_VOICES]")
    p.add_argument("--segment-chars", type=int, default=from_env("CHORUS_SEGMENT_CHARS", 240),
                   help="long texts are spoken in pieces of about this many characters")
    p.add_argument("--lookahead", type=int, default=from_env("CHORUS_LOOKAHEAD", 1),
                   help="pieces generated ahead of the one being relayed")
    p.add_argument("--request-deadline", type=float, default=from_env("CHORUS_REQUEST_DEADLINE", 600),
                   help="seconds a call may take when the client sets no deadline")
    p.add_argument("--stall-floor", type=float, default=from_env("CHORUS_STALL_FLOOR", GATEWAY_STALL.floor_s),
                   help="seconds a token server may send no audio mid-stream before it is taken for hung and the "
                        "stream replayed on another, at the least [CHORUS_STALL_FLOOR]")
    p.add_argument("--stall-margin", type=float, default=from_env("CHORUS_STALL_MARGIN", GATEWAY_STALL.margin_s),
                   help="... and past the floor, once the listener's lead is down to this many seconds; keep it "
                        "below the token servers' --pace-lead [CHORUS_STALL_MARGIN]")
    p.add_argument("--start-buffer-ms", type=float, default=from_env("CHORUS_START_BUFFER_MS", 150),
                   help="audio a listener buffers before playback starts; late audio after that counts as an "
                        "underrun [CHORUS_START_BUFFER_MS]")
    p.add_argument("--http-port", default=env("CHORUS_HTTP_PORT", str(DEFAULT_HTTP_PORT)),
                   help="HTTP port for OpenAI's /v1/audio/speech, the browser page at / and /health, with the "
                        "gRPC port's keys and limits (HTTPS with its certificate when --tls-* are set); "
                        f"0 picks one, off disables (default {DEFAULT_HTTP_PORT}) [CHORUS_HTTP_PORT]")
    p.add_argument("--http-read-timeout", type=float, default=from_env("CHORUS_HTTP_READ_TIMEOUT", 15.0),
                   help="seconds the HTTP port waits for a request's headers (also between requests on a "
                        "kept-alive connection) and for its body before it closes the connection or answers "
                        "408 [CHORUS_HTTP_READ_TIMEOUT]")
    p.add_argument("--cors-origins", default=env("CHORUS_CORS_ORIGINS", ""),
                   help="comma-separated origins (https://app.example.com) whose pages may call the HTTP port "
                        "from a browser; default none [CHORUS_CORS_ORIGINS]")
    p.add_argument("--api-keys-file", default=env("CHORUS_API_KEYS_FILE"),
                   help="file of `<key id>:<secret>` lines; every call on either port but health, reflection "
                        "and the page then needs `authorization: Bearer <secret>`; re-read when it changes "
                        "[CHORUS_API_KEYS_FILE]")
    p.add_argument("--max-streams-per-client", type=int, default=from_env("CHORUS_MAX_STREAMS_PER_CLIENT", 64),
                   help="most synthesis streams one client address (or certificate identity at an address) "
                        "may hold, on both ports together; 0 no limit "
                        "[CHORUS_MAX_STREAMS_PER_CLIENT]")
    p.add_argument("--max-streams-per-key", type=int, default=from_env("CHORUS_MAX_STREAMS_PER_KEY", 64),
                   help="most synthesis streams one API key may hold, on both ports together; 0 no limit "
                        "[CHORUS_MAX_STREAMS_PER_KEY]")
    add_common_flags(p, default_port=50051)
    return parse_flags(p, argv)


def build_config(args: argparse.Namespace) -> GatewayConfig:
    voices = parse_voices(args.voices)
    return GatewayConfig(
        token_servers=tuple(args.token_servers.split(",")),
        host=args.host,
        max_text_chars=args.max_text_chars,
        segment_target_chars=args.segment_chars,
        lookahead_segments=args.lookahead,
        request_deadline_s=args.request_deadline,
        stall=StallPolicy(args.stall_floor, args.stall_margin),
        voices=voices,
        default_voice=voices[0],
        voice_store=args.voice_store or None,
        max_voices=args.max_voices,
        start_buffer_s=args.start_buffer_ms / 1000.0,
        http_port=_http_port(args.http_port),
        http_read_timeout_s=args.http_read_timeout,
        cors_origins=tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()),
        tls=tls_files(args),
        api_keys_file=args.api_keys_file or None,
        max_streams_per_client=args.max_streams_per_client,
        max_streams_per_key=args.max_streams_per_key,
        **allowed_clients(args),
    )


def _http_port(value: str) -> int | None:
    if value.strip().lower() == "off":
        return None
    if not value.strip().isdigit():
        raise ValueError(f"--http-port must be a port number or off, got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> None:
    run(tracing.GATEWAY, parse_args(argv), build_config, "gateway.server:start_server", metrics.REGISTRY)


if __name__ == "__main__":
    main()
