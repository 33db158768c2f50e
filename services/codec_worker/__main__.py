"""`python -m services.codec_worker` / `chorus-codec-worker`: flags and env to config, then serve."""

from __future__ import annotations

import argparse
import logging
import os

from chorus.realtime.cpu_budget import cpu_budget, shared_cores_notice, sleep_idle_threads
from chorus.rpc.entrypoint import (
    add_calibration_flag,
    add_common_flags,
    allowed_clients,
    from_env,
    parse_flags,
    run,
    tls_files,
)
from chorus.speech import codecs
from chorus.telemetry import tracing
from services.codec_worker import metrics, numeric_mode
from services.codec_worker.config import (
    CODEC_CAPACITY_MARGIN, DECODER_PRECISION_DEFAULT, DECODER_PRECISIONS, DEVICES, NUMERIC_MODE_DEFAULT,
    NUMERIC_MODES, SERVED_CODECS, CodecWorkerConfig,
)

DEFAULT_PORT = 50053


def _optional(kind):
    return lambda value: None if value in (None, "") else kind(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="chorus-codec-worker", description="codec worker: code frames in, PCM out")
    p.add_argument("--model-dir", default=env("CHORUS_SNAC_DIR"),
                   help="the codec's directory with config.json and pytorch_model.bin [CHORUS_SNAC_DIR]")
    p.add_argument("--codec", choices=SERVED_CODECS, default=env("CHORUS_CODEC", codecs.SNAC_24KHZ),
                   help="what --model-dir holds: SNAC (Orpheus) or NeuCodec (NeuTTS-Air) [CHORUS_CODEC]")
    p.add_argument("--device", choices=DEVICES, default=from_env("CHORUS_CODEC_DEVICE", "auto"),
                   help="auto picks CUDA when present [CHORUS_CODEC_DEVICE]")
    p.add_argument("--half", action="store_true", default=env("CHORUS_CODEC_HALF", "") == "1",
                   help="float16 on CUDA [CHORUS_CODEC_HALF=1]")
    p.add_argument("--max-streams", type=int, default=from_env("CHORUS_MAX_STREAMS", 64),
                   help="open streams before RESOURCE_EXHAUSTED [CHORUS_MAX_STREAMS]")
    p.add_argument("--max-batch", type=int, default=from_env("CHORUS_MAX_BATCH", 16),
                   help="most streams decoded in one forward [CHORUS_MAX_BATCH]")
    p.add_argument("--batch-wait-ms", type=_optional(float), default=from_env("CHORUS_BATCH_WAIT_MS"),
                   help="longest wait for more streams to share a forward; default by device "
                        "(CPU 5, CUDA 2) [CHORUS_BATCH_WAIT_MS]")
    p.add_argument("--torch-threads", type=int, default=from_env("CHORUS_TORCH_THREADS"),
                   help="most torch threads a decode step uses; default: the CPUs this process may use "
                        "(affinity and cgroup quota) [CHORUS_TORCH_THREADS]")
    p.add_argument("--capacity-margin", type=float, default=from_env("CHORUS_CAPACITY_MARGIN", CODEC_CAPACITY_MARGIN),
                   help="spare speed each stream keeps when capacity is counted (default %(default)s) [CHORUS_CAPACITY_MARGIN]")
    p.add_argument("--max-streams-per-client", type=_optional(int), default=from_env("CHORUS_MAX_STREAMS_PER_CLIENT"),
                   help="most streams one client (a token server) may hold, so no one client takes the whole "
                        "cap; default half of --max-streams, 0 no limit [CHORUS_MAX_STREAMS_PER_CLIENT]")
    p.add_argument("--start-timeout", type=float, default=env("CHORUS_START_TIMEOUT", "10"),
                   help="seconds a new stream may take to send DecodeStart [CHORUS_START_TIMEOUT]")
    p.add_argument("--idle-timeout", type=float, default=env("CHORUS_IDLE_TIMEOUT", "30"),
                   help="seconds an unfinished stream may neither send frames nor read audio before it is "
                        "ended with DEADLINE_EXCEEDED [CHORUS_IDLE_TIMEOUT]")
    p.add_argument("--numeric-mode", choices=NUMERIC_MODES, default=from_env("CHORUS_NUMERIC_MODE", NUMERIC_MODE_DEFAULT),
                   help="MKL kernels on CPU: vendor (each CPU vendor's fast kernels; a stream fails over only to "
                        "workers of its vendor) or compatible (the same bits on every x86 CPU, 1.65-3x the decode "
                        "time) [CHORUS_NUMERIC_MODE]")
    p.add_argument("--decoder-precision", choices=DECODER_PRECISIONS,
                   default=from_env("CHORUS_DECODER_PRECISION", DECODER_PRECISION_DEFAULT),
                   help="the decoder's channel mixes in fp32 or bf16; auto (default) is bf16 where the CPU has "
                        "native bf16 (AVX512-BF16, AMX) or CUDA takes it, else fp32. Each gives its own bits; "
                        "a stream fails over only to workers of its mode [CHORUS_DECODER_PRECISION]")
    add_calibration_flag(p, "decoder", "the capacity it reports then starts at its stream limit")
    add_common_flags(p, default_port=DEFAULT_PORT)
    args = parse_flags(p, argv)
    if not args.model_dir:
        p.error("--model-dir (or CHORUS_SNAC_DIR) is required: a SNAC directory, e.g. from `chorus models demo`")
    return args


def build_config(args: argparse.Namespace) -> CodecWorkerConfig:
    torch_threads = args.torch_threads
    if torch_threads is None:  # logged here: `run` has configured logging by now
        torch_threads = cpu_budget().threads
        logging.getLogger("services.codec_worker").warning(
            shared_cores_notice(torch_threads, "--torch-threads", "CHORUS_TORCH_THREADS"))
    return CodecWorkerConfig(
        calibrate=args.calibrate,
        model_dir=args.model_dir,
        device=args.device,
        half=args.half,
        max_streams=args.max_streams,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        host=args.host,
        torch_threads=torch_threads,
        capacity_margin=args.capacity_margin,
        max_streams_per_client=args.max_streams_per_client,
        start_timeout_s=args.start_timeout,
        idle_timeout_s=args.idle_timeout,
        tls=tls_files(args),
        numeric_mode=args.numeric_mode,
        decoder_precision=args.decoder_precision,
        codec=args.codec,
        **allowed_clients(args),
    )


def main(argv: list[str] | None = None) -> None:
    sleep_idle_threads()  # before torch loads its OpenMP runtime: model.py imports torch
    from services.codec_worker.model import ModelLoadError

    args = parse_args(argv)
    # Before torch's first MKL call, which fixes MKL's mode for the process.
    numeric_mode.select(args.numeric_mode)
    run(tracing.CODEC_WORKER, args, build_config, "services.codec_worker.server:start_server",
        metrics.REGISTRY,         fatal=(ValueError, ModelLoadError))


if __name__ == "__main__":
    main()
