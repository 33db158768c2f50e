"""`python -m services.token_server` / `chorus-token-server`: flags and env to config, then serve."""

from __future__ import annotations

import argparse
import logging
import os

from chorus.realtime.cpu_budget import shared_cores_notice, sleep_idle_threads
from chorus.rpc.entrypoint import (
    add_calibration_flag,
    add_common_flags,
    allowed_clients,
    from_env,
    parse_flags,
    run,
    tls_files,
)
from chorus.speech.orpheus import DEFAULT_BUDGET_HEADROOM
from chorus.speech.phonemes import DEFAULT_LANGUAGE
from chorus.speech.voices import VOICES_FLAG_HELP, parse_voices
from chorus.telemetry import tracing
from services.token_server import metrics
from services.token_server.config import TokenServerConfig, default_llama_threads, default_slots


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="chorus-token-server", description="Orpheus backbone on llama.cpp, N slots")
    p.add_argument("--model", default=env("CHORUS_MODEL"), help="backbone GGUF path [CHORUS_MODEL]")
    p.add_argument("--codec-workers", default=env("CHORUS_CODEC_WORKERS", ""),
                   help="comma-separated host:port of codec workers; names resolving to several "
                        "addresses (a headless Service) give one worker each [CHORUS_CODEC_WORKERS]")
    p.add_argument("--slots", type=int, default=from_env("CHORUS_SLOTS", default_slots()),
                   help="parallel sequences; real-time capacity decides how many run [CHORUS_SLOTS]")
    p.add_argument("--ctx-per-slot", type=int, default=from_env("CHORUS_CTX_PER_SLOT", 4096),
                   help="context tokens of each slot: prompt + generated audio [CHORUS_CTX_PER_SLOT]")
    p.add_argument("--n-batch", type=int, default=from_env("CHORUS_N_BATCH", 512),
                   help="tokens per engine step [CHORUS_N_BATCH]")
    p.add_argument("--llama-threads", type=int, default=from_env("CHORUS_LLAMA_THREADS"),
                   help="llama.cpp compute threads; default: the CPUs this process may use (affinity and "
                        "cgroup quota) [CHORUS_LLAMA_THREADS]")
    p.add_argument("--pace-lead", type=float, default=from_env("CHORUS_PACE_LEAD", 2.0),
                   help="a stream this many seconds of audio ahead of its listener sits steps out while others "
                        "need them; 0 never paces [CHORUS_PACE_LEAD]")
    p.add_argument("--capacity-margin", type=float, default=from_env("CHORUS_CAPACITY_MARGIN", 0.15),
                   help="spare speed each admitted stream keeps (0.15: 1.15x real time) [CHORUS_CAPACITY_MARGIN]")
    p.add_argument("--queue-size", type=int, default=from_env("CHORUS_QUEUE_SIZE", 32),
                   help="requests that may wait for a slot before RESOURCE_EXHAUSTED [CHORUS_QUEUE_SIZE]")
    p.add_argument("--budget-headroom", type=float, default=from_env("CHORUS_BUDGET_HEADROOM", DEFAULT_BUDGET_HEADROOM),
                   help="for requests without max_tokens, the generation budget is this many times ~6 tokens "
                        "a character (+2 s): it stops runaway generation [CHORUS_BUDGET_HEADROOM]")
    p.add_argument("--gpu-layers", type=int, default=from_env("CHORUS_GPU_LAYERS", 0),
                   help="backbone layers to offload to the GPU: 0 none (CPU), -1 all; needs a CUDA build "
                        "of llama-cpp-python [CHORUS_GPU_LAYERS]")
    p.add_argument("--max-streams-per-client", type=int, default=from_env("CHORUS_MAX_STREAMS_PER_CLIENT", 0),
                   help="most Generate streams one client (a gateway) may hold; 0 no limit "
                        "[CHORUS_MAX_STREAMS_PER_CLIENT]")
    p.add_argument("--voices", default=env("CHORUS_VOICES", ""), help=VOICES_FLAG_HELP)
    p.add_argument("--voice-store", default=env("CHORUS_VOICE_STORE"),
                   help="folder of voices registered from reference audio, which a NeuTTS backbone speaks "
                        "[CHORUS_VOICE_STORE]")
    p.add_argument("--phoneme-language", default=env("CHORUS_PHONEME_LANGUAGE", DEFAULT_LANGUAGE),
                   help="espeak-ng language of the text, for a backbone that reads phonemes "
                        "[CHORUS_PHONEME_LANGUAGE]")
    add_calibration_flag(p, "backbone", "real-time capacity then starts at the slot limit")
    add_common_flags(p, default_port=50052)
    args = parse_flags(p, argv)
    if not args.model:
        p.error("--model (or CHORUS_MODEL) is required: a backbone GGUF, e.g. from `chorus models demo`")
    return args


def build_config(args: argparse.Namespace) -> TokenServerConfig:
    llama_threads = args.llama_threads
    if llama_threads is None:  # logged here: `run` has configured logging by now
        llama_threads = default_llama_threads()
        logging.getLogger("services.token_server").warning(
            shared_cores_notice(llama_threads, "--llama-threads", "CHORUS_LLAMA_THREADS"))
    return TokenServerConfig(
        calibrate=args.calibrate,
        model_path=args.model,
        codec_workers=tuple(args.codec_workers.split(",")) if args.codec_workers else (),
        slots=args.slots,
        ctx_per_slot=args.ctx_per_slot,
        n_batch=args.n_batch,
        llama_threads=llama_threads,
        pace_lead_s=args.pace_lead or None,
        capacity_margin=args.capacity_margin,
        queue_size=args.queue_size,
        budget_headroom=args.budget_headroom,
        gpu_layers=args.gpu_layers,
        voices=parse_voices(args.voices),
        voice_store=args.voice_store or None,
        phoneme_language=args.phoneme_language,
        host=args.host,
        tls=tls_files(args),
        max_streams_per_client=args.max_streams_per_client,
        **allowed_clients(args),
    )


def main(argv: list[str] | None = None) -> None:
    sleep_idle_threads()  # before llama.cpp loads its OpenMP runtime (start_server imports it)
    run(tracing.TOKEN_SERVER, parse_args(argv), build_config, "services.token_server.server:start_server",
        metrics.REGISTRY, fatal=(ValueError, RuntimeError))


if __name__ == "__main__":
    main()
