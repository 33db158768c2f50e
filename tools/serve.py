"""`chorus serve`: the whole stack on local processes, until Ctrl-C, or for one `--say`.

The supervisor (tools/supervisor.py) launches and stops the services; this module
only turns flags into a Stack (metrics ports spread from one base, one OTLP endpoint
for all: see Stack) and, with `--say`, runs one synthesis through the
gateway with the `chorus say` client.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from chorus.realtime.cpu_budget import cpu_budget, split_for_stack
from tools.supervisor import DEFAULT_MODELS_DIR, Stack, StackError, serves_neutts_by_default

DEFAULT_GATEWAY_PORT = 50051


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(
        name, help=help_text,
        description="Start codec worker, token server and gateway as local processes.",
    )
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR,
                   help="weights folder: one backbone .gguf and one SNAC folder (config.json, pytorch_model.bin) "
                        "are served as they are; a missing or empty folder gets demo models "
                        f"(default {DEFAULT_MODELS_DIR}). Files Chorus did not create are never overwritten")
    p.add_argument("--demo-models", action="store_true",
                   help="build demo models (random weights) into --models; refused if it holds other files")
    p.add_argument("--slots", type=int, default=None,
                   help="token server slots (most parallel streams; real-time capacity admits fewer when the "
                        "machine cannot hold them); default: the token server's")
    p.add_argument("--neutts", action=argparse.BooleanOptionalAction, default=None,
                   help="serve the NeuTTS-Air family beside Orpheus from MODELS/neutts: a NeuCodec worker, a "
                        "NeuTTS token server, and its voice store, whose voices (the demo's: demo; those "
                        "registered through the gateway) the gateway routes to it. Default: on with demo models "
                        "(built beside them) or when MODELS/neutts exists; --no-neutts serves Orpheus only")
    p.add_argument("--token-servers", type=int, default=1, help="token server processes")
    p.add_argument("--codec-workers", type=int, default=1, help="codec worker processes")
    share = split_for_stack(cpu_budget())  # one pair; NeuTTS-Air adds a second, which halves these
    p.add_argument("--llama-threads", type=int, default=None,
                   help=f"llama.cpp threads per token server; default: this machine's CPUs divided between the "
                        f"processes (here {share.llama})")
    p.add_argument("--torch-threads", type=int, default=None,
                   help=f"torch threads per codec worker; default: the rest of the division (here {share.torch})")
    for service in ("token-server", "codec-worker", "gateway"):
        p.add_argument(f"--{service}-arg", action="append", default=[], metavar="FLAG",
                       help=f"pass FLAG to every {service.replace('-', ' ')} (repeat; e.g. "
                            f"--{service}-arg=--log-level=DEBUG)")
    p.add_argument("--gateway-port", type=int, default=None,
                   help=f"gateway port; 0 picks one (default: the port of CHORUS_GATEWAY if set, else "
                        f"{DEFAULT_GATEWAY_PORT}, where `chorus say` looks)")
    p.add_argument("--http-port", default=None,
                   help="gateway HTTP port (OpenAI endpoint, browser page at /); 0 picks one, off disables "
                        "(default: CHORUS_HTTP_PORT, else 8080; with --say: off)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="BASE",
                   help="Prometheus /metrics ports from BASE: the gateway on BASE, token servers on BASE+1.., "
                        "codec workers after them (BASE+2 with one of each); 0 disables "
                        "(default: CHORUS_METRICS_PORT, else none)")
    p.add_argument("--otlp-endpoint", default=None,
                   help="OTLP/gRPC trace receiver host:port for every service, e.g. Jaeger's 4317 (default: "
                        "CHORUS_OTLP_ENDPOINT, else the standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, else none)")
    p.add_argument("--say", default=None, metavar="TEXT", help="synthesize TEXT through the stack, then stop it")
    p.add_argument("-o", "--output", default="out.wav",
                   help="audio file for --say; its extension picks the format (default out.wav)")
    p.add_argument("--log-level", default="INFO", help="services' log level (logs in a temporary folder)")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.say is not None:
        from tools.client import OutputError, output_format

        try:
            output_format(args.output, None)
        except OutputError as err:  # before minutes of startup, not after
            print(f"chorus serve: {err}", file=sys.stderr)
            return 2
    neutts = args.neutts if args.neutts is not None else serves_neutts_by_default(args.models, args.demo_models)
    if not neutts and args.neutts is None:
        progress(f"NeuTTS-Air: not served ({args.models} holds real weights and no neutts/ folder)")
    try:
        metrics_port = _metrics_port(args.metrics_port, 1 + args.token_servers + args.codec_workers + 2 * neutts)
    except ValueError as err:
        print(f"chorus serve: {err}", file=sys.stderr)
        return 2
    stack = Stack(
        models_dir=args.models, demo_models=args.demo_models, slots=args.slots, token_servers=args.token_servers,
        codec_workers=args.codec_workers, llama_threads=args.llama_threads, torch_threads=args.torch_threads,
        gateway_port=_gateway_port(args.gateway_port), gateway_http_port=_http_port(args), log_level=args.log_level,
        on_progress=progress, metrics_port=metrics_port, neutts=neutts,
        otlp_endpoint=args.otlp_endpoint or os.environ.get("CHORUS_OTLP_ENDPOINT") or None,
        extra_args={"token_server": args.token_server_arg, "codec_worker": args.codec_worker_arg,
                    "gateway": args.gateway_arg},
    )
    try:
        stack.start()
    except StackError as err:
        print(f"chorus serve: {err}", file=sys.stderr)
        return 1
    try:
        print(f"gateway: {stack.gateway_address}", flush=True)
        if stack.gateway_http_address:
            # With TLS the gateway's HTTP port speaks HTTPS only (docs/security.md).
            tls = os.environ.get("CHORUS_TLS_CERT") or any(a.startswith("--tls-cert") for a in args.gateway_arg)
            print(f"HTTP: {'https' if tls else 'http'}://{stack.gateway_http_address}/ (browser page; OpenAI API at "
                  "/v1/audio/speech)", flush=True)
        if stack.metrics_addresses:
            print("metrics: " + ", ".join(f"{name} http://{address}/metrics"
                                          for name, address in stack.metrics_addresses.items()), flush=True)
        if stack.neutts_voice_store is not None:
            print(f"NeuTTS-Air: voices in {stack.neutts_voice_store} (register more with `chorus voices --add`)",
                  flush=True)
        if args.say is not None:
            return _say_once(stack, args.say, args.output)
        progress(f"serving; logs in {stack.work_dir}; Ctrl-C stops")
        return _serve_until_signalled(stack)
    finally:
        progress("stopping")
        stack.stop()


def _http_port(args: argparse.Namespace) -> int | None:
    value = args.http_port or os.environ.get("CHORUS_HTTP_PORT") or ("off" if args.say is not None else "8080")
    return None if value == "off" else int(value)


def _metrics_port(flag: int | None, services: int) -> int | None:
    """--metrics-port, else CHORUS_METRICS_PORT: the base the services' ports are spread
    from (a service's own variable would put all three on one port); 0 or neither: none."""
    raw = os.environ.get("CHORUS_METRICS_PORT", "") if flag is None else str(flag)
    if not raw.strip():
        return None
    try:
        base = int(raw)
    except ValueError:
        raise ValueError(f"CHORUS_METRICS_PORT={raw!r} is not a port number") from None
    if base < 0 or base + services - 1 > 65535:
        raise ValueError(f"metrics port {base} leaves no room for the {services} services' ports from it")
    return base or None


def _gateway_port(flag: int | None) -> int:
    """--gateway-port, else the port of CHORUS_GATEWAY (so `chorus say` finds it), else the default."""
    if flag is not None:
        return flag
    address = os.environ.get("CHORUS_GATEWAY", "")
    port = address.rpartition(":")[2]
    return int(port) if port.isdigit() else DEFAULT_GATEWAY_PORT


def _say_once(stack: Stack, text: str, output: str) -> int:
    import grpc

    from tools.client import describe, open_output, output_format, patch_stream_header, say

    fmt = output_format(output, None)
    try:
        with open_output(output) as out:
            result = say(stack.gateway_address, text, out, encoding=fmt.name)
    except grpc.RpcError as err:
        Path(output).unlink(missing_ok=True)
        print(f"chorus serve --say: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    patch_stream_header(output, fmt, result.samples)
    print(output)
    print(describe(result), file=sys.stderr)
    return 0


def _serve_until_signalled(stack: Stack) -> int:
    stopping = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(True))
    while not stopping:
        try:
            stack.check_alive()
        except StackError as err:
            print(f"chorus serve: {err}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    return 0
