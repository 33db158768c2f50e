"""`python -m services.token_server` / `chorus-token-server`: flags and env to config, then serve."""

from __future__ import annotations

import argparse
import asyncio
import os

from chorus import telemetry
from chorus.serving import configure_logging, run_until_signalled, write_ready_file
from services.token_server.config import TokenServerConfig, default_slots


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="chorus-token-server", description="Orpheus backbone on llama.cpp, N slots")
    p.add_argument("--model", default=env("CHORUS_MODEL"), help="backbone GGUF path [CHORUS_MODEL]")
    p.add_argument("--codec-workers", default=env("CHORUS_CODEC_WORKERS", ""),
                   help="comma-separated host:port of codec workers [CHORUS_CODEC_WORKERS]")
    p.add_argument("--slots", type=int, default=int(env("CHORUS_SLOTS", default_slots())), help="parallel sequences [CHORUS_SLOTS]")
    p.add_argument("--ctx-per-slot", type=int, default=int(env("CHORUS_CTX_PER_SLOT", 4096)))
    p.add_argument("--n-batch", type=int, default=int(env("CHORUS_N_BATCH", 512)), help="tokens per engine step")
    p.add_argument("--threads", type=int, default=int(env("CHORUS_THREADS", os.cpu_count() or 1)))
    p.add_argument("--queue-size", type=int, default=int(env("CHORUS_QUEUE_SIZE", 32)),
                   help="requests that may wait for a slot before RESOURCE_EXHAUSTED")
    p.add_argument("--host", default=env("CHORUS_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("CHORUS_PORT", 50052)))
    p.add_argument("--ready-file", default=None, help="write the bound address here once SERVING")
    p.add_argument("--otlp-endpoint", default=env("CHORUS_OTLP_ENDPOINT"), help="OTLP/gRPC receiver host:port")
    p.add_argument("--metrics-port", type=int, default=int(env("CHORUS_METRICS_PORT", 0)), help="Prometheus port; 0 off")
    p.add_argument("--drain-seconds", type=float, default=float(env("CHORUS_DRAIN_SECONDS", 30)))
    p.add_argument("--log-level", default=env("CHORUS_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model (or CHORUS_MODEL) is required: a backbone GGUF, e.g. from `chorus models demo`")
    return args


async def serve(args: argparse.Namespace) -> None:
    from services.token_server.server import start_server

    config = TokenServerConfig(
        model_path=args.model,
        codec_workers=tuple(args.codec_workers.split(",")) if args.codec_workers else (),
        slots=args.slots,
        ctx_per_slot=args.ctx_per_slot,
        n_batch=args.n_batch,
        threads=args.threads,
        queue_size=args.queue_size,
        host=args.host,
        drain_grace_s=args.drain_seconds,
        otlp_endpoint=args.otlp_endpoint,
        metrics_port=args.metrics_port,
    )
    telemetry.setup_tracing(telemetry.TOKEN_SERVER, config.otlp_endpoint)
    telemetry.start_metrics_server(config.metrics_port, telemetry.TOKEN_SERVER)
    running = await start_server(config, port=args.port)
    write_ready_file(args.ready_file, running)
    try:
        await run_until_signalled(running, config.drain_grace_s)
    finally:
        telemetry.shutdown_tracing()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        asyncio.run(serve(args))
    except ValueError as err:  # config validation: say what is wrong, no traceback
        raise SystemExit(str(err)) from None


if __name__ == "__main__":
    main()
