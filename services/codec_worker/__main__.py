"""`python -m services.codec_worker` / `chorus-codec-worker`: flags and env to config, then serve."""

from __future__ import annotations

import argparse
import asyncio
import os

from chorus.serving import configure_logging, run_until_signalled, write_ready_file
from services.codec_worker.config import DEVICES, CodecWorkerConfig
from services.codec_worker.model import ModelLoadError


def _optional(kind):
    return lambda value: None if value in (None, "") else kind(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="chorus-codec-worker", description="SNAC codec worker: code frames in, PCM out")
    p.add_argument("--model-dir", default=env("CHORUS_SNAC_DIR"),
                   help="SNAC directory with config.json and pytorch_model.bin [CHORUS_SNAC_DIR]")
    p.add_argument("--device", choices=DEVICES, default=env("CHORUS_CODEC_DEVICE", "auto"),
                   help="auto picks CUDA when present [CHORUS_CODEC_DEVICE]")
    p.add_argument("--half", action="store_true", default=env("CHORUS_CODEC_HALF", "") == "1",
                   help="float16 on CUDA [CHORUS_CODEC_HALF=1]")
    p.add_argument("--host", default=env("CHORUS_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("CHORUS_PORT", 50053)), help="0 picks a free port")
    p.add_argument("--max-streams", type=int, default=int(env("CHORUS_MAX_STREAMS", 64)),
                   help="open streams before RESOURCE_EXHAUSTED [CHORUS_MAX_STREAMS]")
    p.add_argument("--max-batch", type=int, default=int(env("CHORUS_MAX_BATCH", 16)), help="streams per forward")
    p.add_argument("--batch-wait-ms", type=_optional(float), default=_optional(float)(env("CHORUS_BATCH_WAIT_MS")),
                   help="longest wait for more streams to share a forward; default by device (CPU 0, CUDA 2)")
    p.add_argument("--threads", type=_optional(int), default=_optional(int)(env("CHORUS_THREADS")),
                   help="torch intra-op threads; default torch's")
    p.add_argument("--ready-file", default=None, help="write the bound address here once SERVING")
    p.add_argument("--drain-seconds", type=float, default=float(env("CHORUS_DRAIN_SECONDS", 30)))
    p.add_argument("--log-level", default=env("CHORUS_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    if not args.model_dir:
        p.error("--model-dir (or CHORUS_SNAC_DIR) is required: a SNAC directory, e.g. from `chorus models demo`")
    return args


def build_config(args: argparse.Namespace) -> CodecWorkerConfig:
    return CodecWorkerConfig(
        model_dir=args.model_dir,
        device=args.device,
        half=args.half,
        max_streams=args.max_streams,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        host=args.host,
        threads=args.threads,
        drain_grace_s=args.drain_seconds,
    )


async def serve(config: CodecWorkerConfig, port: int, ready_file: str | None) -> None:
    from services.codec_worker.server import start_server

    running = await start_server(config, port=port)
    write_ready_file(ready_file, running)
    await run_until_signalled(running, config.drain_grace_s)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = build_config(args)
        asyncio.run(serve(config, args.port, args.ready_file))
    except (ValueError, ModelLoadError) as err:  # say what is wrong, no traceback
        raise SystemExit(str(err)) from None


if __name__ == "__main__":
    main()
