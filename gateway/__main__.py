"""`python -m gateway` / `chorus-gateway`: flags and env to config, then serve."""

from __future__ import annotations

import argparse
import asyncio
import os

from chorus.serving import configure_logging, run_until_signalled, write_ready_file
from gateway.config import GatewayConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="chorus-gateway", description="Chorus client-facing gRPC gateway")
    p.add_argument("--token-servers", default=env("CHORUS_TOKEN_SERVERS", ""),
                   help="comma-separated host:port of token servers [CHORUS_TOKEN_SERVERS]")
    p.add_argument("--host", default=env("CHORUS_HOST", "127.0.0.1"), help="address to bind [CHORUS_HOST]")
    p.add_argument("--port", type=int, default=int(env("CHORUS_PORT", 50051)), help="port; 0 picks one [CHORUS_PORT]")
    p.add_argument("--ready-file", default=None, help="write the bound address here once SERVING")
    p.add_argument("--max-text-chars", type=int, default=int(env("CHORUS_MAX_TEXT_CHARS", 20_000)))
    p.add_argument("--voices", default=env("CHORUS_VOICES", ""),
                   help="comma-separated voice names, the default first (default: Orpheus's) [CHORUS_VOICES]")
    p.add_argument("--segment-chars", type=int, default=int(env("CHORUS_SEGMENT_CHARS", 240)),
                   help="long texts are spoken in pieces of about this many characters")
    p.add_argument("--lookahead", type=int, default=int(env("CHORUS_LOOKAHEAD", 1)),
                   help="pieces generated ahead of the one being relayed")
    p.add_argument("--request-deadline", type=float, default=float(env("CHORUS_REQUEST_DEADLINE", 600)),
                   help="seconds a call may take when the client sets no deadline")
    p.add_argument("--drain-seconds", type=float, default=float(env("CHORUS_DRAIN_SECONDS", 30)))
    p.add_argument("--log-level", default=env("CHORUS_LOG_LEVEL", "INFO"))
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> GatewayConfig:
    voices = tuple(v.strip() for v in args.voices.split(",") if v.strip())
    extra = {"voices": voices, "default_voice": voices[0]} if voices else {}
    return GatewayConfig(
        token_servers=tuple(args.token_servers.split(",")),
        host=args.host,
        max_text_chars=args.max_text_chars,
        segment_target_chars=args.segment_chars,
        lookahead_segments=args.lookahead,
        request_deadline_s=args.request_deadline,
        drain_grace_s=args.drain_seconds,
        **extra,
    )


async def serve(config: GatewayConfig, port: int, ready_file: str | None) -> None:
    from gateway.server import start_server

    running = await start_server(config, port=port)
    write_ready_file(ready_file, running)
    await run_until_signalled(running, config.drain_grace_s)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = build_config(args)
    except ValueError as err:  # say what is wrong, no traceback
        raise SystemExit(str(err)) from None
    asyncio.run(serve(config, args.port, args.ready_file))


if __name__ == "__main__":
    main()
