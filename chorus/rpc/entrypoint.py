"""What every service's `__main__` shares: the common flags, telemetry, the ready
file, and serving until SIGTERM with a drain.

Each service parses its own flags (plus these), builds its typed config in one place,
and hands both to `run`, so the three processes start, report and stop alike.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import importlib
import os
from typing import Callable

from prometheus_client import CollectorRegistry

from chorus.rpc.errors import StartupError
from chorus.rpc.serving import LOG_FORMATS, configure_logging, run_until_signalled, write_ready_file
from chorus.security.tls import TlsFiles
from chorus.telemetry import tracing

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _FromEnvironment:
    """A flag's default taken from an environment variable, as text: converted only
    after parsing (see parse_flags), so --help works whatever the variable holds and a
    bad value is reported with the variable's name."""

    def __init__(self, name: str, raw: str) -> None:
        self.name, self.raw = name, raw


def from_env(name: str, fallback: object = None) -> object:
    """The default of a flag that `name` can also set; `fallback` when it is unset."""
    raw = os.environ.get(name)
    return fallback if raw is None else _FromEnvironment(name, raw)


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parser.parse_args, then each value that came from the environment converted and
    checked as its flag's would be; a bad one ends the process with a usage error
    naming the variable."""
    args = parser.parse_args(argv)
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not isinstance(value, _FromEnvironment):
            continue
        flag = action.option_strings[0] if action.option_strings else action.dest
        try:
            converted = action.type(value.raw) if action.type else value.raw
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            reason = f": {err}" if isinstance(err, argparse.ArgumentTypeError) else ""
            parser.error(f"{value.name}={value.raw!r} is not a valid value for {flag}{reason}")
        if action.choices is not None and converted not in action.choices:
            parser.error(f"{value.name}={value.raw!r} is not one of {', '.join(map(str, action.choices))} ({flag})")
        setattr(args, action.dest, converted)
    return args


def log_level(value: str) -> str:
    """A logging level name; the flag refuses what logging would silently ignore."""
    if value.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"unknown log level {value!r}; use one of {', '.join(LOG_LEVELS)}")
    return value.upper()


def add_calibration_flag(parser: argparse.ArgumentParser, measured: str, then: str) -> None:
    """--no-calibrate (CHORUS_NO_CALIBRATE=1) into `calibrate`: skip measuring `measured`'s
    step time at every batch size at start; `then` says where capacity starts instead."""
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        default=os.environ.get("CHORUS_NO_CALIBRATE", "") != "1",
                        help=f"skip measuring the {measured}'s step time at every batch size at start: {then} and "
                             "is learned from live steps (tests and demos that do not measure capacity start "
                             "seconds sooner) [CHORUS_NO_CALIBRATE=1]")


def add_common_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    env = os.environ.get
    parser.add_argument("--host", default=env("CHORUS_HOST", "127.0.0.1"), help="address to bind [CHORUS_HOST]")
    parser.add_argument("--port", type=int, default=from_env("CHORUS_PORT", default_port),
                        help=f"port; 0 picks one (default {default_port}) [CHORUS_PORT]")
    parser.add_argument("--ready-file", default=None, help="write the bound address here once SERVING")
    parser.add_argument("--otlp-endpoint", default=env("CHORUS_OTLP_ENDPOINT"),
                        help="OTLP/gRPC trace receiver host:port, e.g. Jaeger's 4317 [CHORUS_OTLP_ENDPOINT]; "
                        "unset, the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT")
    parser.add_argument("--metrics-port", type=int, default=from_env("CHORUS_METRICS_PORT", 0),
                        help="Prometheus /metrics port; 0 disables [CHORUS_METRICS_PORT]")
    parser.add_argument("--drain-seconds", type=float, default=from_env("CHORUS_DRAIN_SECONDS", 30.0),
                        help="on SIGTERM, time given to open streams to finish [CHORUS_DRAIN_SECONDS]")
    parser.add_argument("--log-level", type=log_level, default=from_env("CHORUS_LOG_LEVEL", "INFO"),
                        help=f"one of {', '.join(LOG_LEVELS)} [CHORUS_LOG_LEVEL]")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=from_env("CHORUS_LOG_FORMAT", "text"),
                        help="json: one object a line with trace_id and request_id [CHORUS_LOG_FORMAT]")
    tls = parser.add_argument_group("TLS and access (all off unless set; docs/security.md)")
    tls.add_argument("--tls-cert", default=env("CHORUS_TLS_CERT"),
                     help="PEM certificate chain: this service's server certificate and, on its calls to "
                          "the next tier, its client certificate [CHORUS_TLS_CERT]")
    tls.add_argument("--tls-key", default=env("CHORUS_TLS_KEY"), help="PEM private key of --tls-cert [CHORUS_TLS_KEY]")
    tls.add_argument("--tls-ca", default=env("CHORUS_TLS_CA"),
                     help="PEM CA bundle that peers' certificates must chain to [CHORUS_TLS_CA]")
    tls.add_argument("--allowed-clients", default=env("CHORUS_ALLOWED_CLIENTS"),
                     help="comma-separated client certificate identities (a SAN, or the CN of a certificate "
                          "without SANs) this port takes "
                          "with TLS on; default: the tier in front (token server: chorus-gateway, codec "
                          "worker: chorus-token-server; the gateway takes any client) [CHORUS_ALLOWED_CLIENTS]")


def tls_files(args: argparse.Namespace) -> TlsFiles | None:
    """The --tls-* files, or None for plaintext (ValueError when only some are set)."""
    return TlsFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca)


def allowed_clients(args: argparse.Namespace) -> dict[str, tuple[str, ...]]:
    """`allowed_clients=` for a service config when --allowed-clients is set, else
    nothing (the config's default for its tier applies)."""
    if args.allowed_clients is None:
        return {}
    return {"allowed_clients": tuple(c.strip() for c in args.allowed_clients.split(",") if c.strip())}


def run(
    service: str,
    args: argparse.Namespace,
    build_config: Callable[[argparse.Namespace], object],
    start_server: str,
    metrics: CollectorRegistry,
    fatal: tuple[type[BaseException], ...] = (ValueError,),
) -> None:
    """Builds the config and serves `start_server` ("module:function") until SIGTERM,
    with `metrics` (the service's registry) on --metrics-port.

    Errors in `fatal` (bad config, a model that does not load) and StartupError (a
    port that cannot be bound) end the process with their message and no traceback:
    they are the operator's to fix.
    """
    configure_logging(args.log_level, args.log_format, service)
    # A native library that dies (SIGILL, SIGSEGV) takes no Python exception with it;
    # faulthandler leaves the Python frame it died under in the log, which is how a
    # supervisor tells llama.cpp from torch.
    faulthandler.enable()
    try:
        config = build_config(args)
        module, function = start_server.split(":")
        start = getattr(importlib.import_module(module), function)
        asyncio.run(_serve(service, start, config, args, metrics))
    except (*fatal, StartupError) as err:
        raise SystemExit(f"{service}: {err}") from None


async def _serve(service: str, start, config, args: argparse.Namespace, metrics: CollectorRegistry) -> None:
    tracing.setup_tracing(service, args.otlp_endpoint)
    tracing.start_metrics_server(args.metrics_port, metrics, args.host)
    try:
        running = await start(config, port=args.port)
        write_ready_file(args.ready_file, running)
        await run_until_signalled(running, args.drain_seconds)
    finally:
        tracing.shutdown_tracing()
