"""What every Chorus gRPC server shares: health, reflection (v1 and v1alpha),
standard RPC tracing and request metrics, SIGTERM drain, logging.

Each service's `start_server(config, port=0)` builds its servicers on `new_server`,
then hands the `grpc.aio.Server` to `serve_with_health` so that the three services
behave alike when probed, reflected, traced or terminated.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

import grpc
from opentelemetry import trace
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chorus.rpc import reflection
from chorus.rpc.addresses import dial_address, listen_address
from chorus.rpc.errors import StartupError
from chorus.rpc.request_gate import RequestGate
from chorus.security.access import AccessPolicy
from chorus.security.auth import CallGuard
from chorus.security.tls import ChannelSecurity
from chorus.telemetry import grpc_instrumentation, tracing

log = logging.getLogger(__name__)

# Channels: large enough for a few seconds of PCM in one message, which is what
# flows back to every caller.
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]
# Channels to peers: after a peer restarts, a channel finds it at its next reconnect
# attempt, and gRPC's default backoff grows to minutes; a second at most keeps a
# returning peer's first calls from failing "connection refused".
CHANNEL_OPTIONS = [
    *GRPC_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass
class RunningServer:
    """A started server: its port, its health servicer, and how to stop it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Other listeners of the same service (the gateway's HTTP port): told to drain,
    # with the same grace, while the gRPC server drains.
    on_drain: list[Callable[[float | None], Awaitable[None]]] = field(default_factory=list)
    serving: bool = False
    # Other listeners' addresses by name (the gateway's "http"), for the ready file.
    endpoints: dict[str, str] = field(default_factory=dict)
    # The service's engine objects, for in-process tests and introspection.
    components: dict[str, object] = field(default_factory=dict)
    # Its access policy, which counts the calls in flight for the drain (None for a
    # server not made by new_server).
    access: AccessPolicy | None = None
    _stopped: bool = False
    # What must hold for SERVING, by name: "ready" (warm-up done), and e.g. "upstream".
    _conditions: dict[str, bool] = field(default_factory=dict)
    # The interface it listens on, as configured (--host).
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        """Where a client on this machine dials it (see `addresses.dial_address`)."""
        return dial_address(self.host, self.port)

    async def set_serving(self, serving: bool) -> None:
        """The server's own readiness (warm-up done); SERVING also needs every condition."""
        await self.set_condition("ready", serving)

    async def set_condition(self, name: str, holds: bool) -> None:
        """SERVING only while every named condition holds and the server is not stopping:
        a service that cannot serve (no upstream reachable) says so to its probes."""
        if self._conditions.get(name) == holds:
            return
        self._conditions[name] = holds
        if name != "ready":
            log.log(logging.INFO if holds else logging.WARNING, "health condition %s: %s", name,
                    "holds" if holds else "fails")
        await self._publish()

    async def _publish(self) -> None:
        serving = not self._stopped and self._conditions.get("ready", False) and all(self._conditions.values())
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.serving = serving
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Goes NOT_SERVING and turns new work away while the port stays open (probes
        read NOT_SERVING, not connection refused), lets the calls in flight finish
        within `grace`, then closes the port and releases resources."""
        if self._stopped:
            return
        self._stopped = True
        await self._publish()
        drains = [drain(grace) for drain in self.on_drain]
        if self.access is not None and grace:
            self.access.drain()
            await asyncio.gather(self._drain_calls(grace), *drains)
        else:
            await asyncio.gather(self.server.stop(grace), *drains)
        for hook in reversed(self.on_stop):
            await hook()

    async def _drain_calls(self, grace: float) -> None:
        try:
            await asyncio.wait_for(self.access.wait_idle(), grace)
        except TimeoutError:
            log.warning("%d calls still in flight after the %.1fs drain; cancelling them", self.access.in_flight, grace)
        await self.server.stop(0)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def serve_with_health(
    server: grpc.aio.Server,
    service_names: Iterable[str],
    port: int,
    host: str = "127.0.0.1",
    credentials: grpc.ServerCredentials | None = None,
) -> RunningServer:
    """Adds health and reflection, binds (with TLS when `credentials` are given),
    starts, and reports NOT_SERVING until the caller marks the server ready (after
    warm-up)."""
    names = tuple(service_names)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable(server, (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    address = listen_address(host, port)
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpc says only "Failed to bind"
        bound = 0
    if bound == 0:
        raise StartupError(
            f"cannot listen on {host}:{port}: the address is in use or not available on this host "
            "(choose another --port or --host, or stop what holds it)"
        )
    await server.start()
    running = RunningServer(server=server, port=bound, health=health_servicer, service_names=names,
                            access=getattr(server, "chorus_access", None), host=host)
    await running.set_serving(False)
    return running


def new_server(
    metrics: tracing.RpcMetrics | None = None, policy: AccessPolicy | None = None
) -> grpc.aio.Server:
    """A server whose every call gets a standard SERVER span and, with the service's
    `metrics`, is counted by method and status; inside that span the CallGuard asks
    `policy` (who may call, the drain; none: anyone may) and the RequestGate parses
    the request. Requests over the policy's `max_request_bytes` get RESOURCE_EXHAUSTED."""
    policy = policy or AccessPolicy()
    options = [(k, v) for k, v in GRPC_OPTIONS if k != "grpc.max_receive_message_length"]
    options.append(("grpc.max_receive_message_length", policy.max_request_bytes))
    server = grpc.aio.server(
        options=options,
        interceptors=[*grpc_instrumentation.server_interceptors(metrics), CallGuard(policy), RequestGate()],
    )
    server.chorus_access = policy  # serve_with_health hands it to the RunningServer
    return server


def new_channel(target: str, security: ChannelSecurity | None = None) -> grpc.aio.Channel:
    """A channel whose every call gets a standard CLIENT span and carries the trace,
    secured as `security` says (plaintext by default)."""
    return (security or ChannelSecurity()).aio_channel(target, CHANNEL_OPTIONS, grpc_instrumentation.client_interceptors())


async def run_until_signalled(running: RunningServer, grace: float) -> None:
    """Serves until SIGTERM or SIGINT, then drains: NOT_SERVING, finish streams, stop."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await stop_requested.wait()
    log.info("signal received: draining for up to %.1fs", grace)
    await running.stop(grace)


LOG_FORMATS = ("text", "json")


class _RequestFields(logging.Filter):
    """Puts the trace id, span id and request id of the request being served (empty
    outside one) on every record, for the JSON formatter to write."""

    def filter(self, record: logging.LogRecord) -> bool:
        span = trace.get_current_span().get_span_context()
        record.trace_id = trace.format_trace_id(span.trace_id) if span.is_valid else ""
        record.span_id = trace.format_span_id(span.span_id) if span.is_valid else ""
        record.request_id = tracing.REQUEST_ID.get()
        return True


def log_handler(fmt: str = "text", service: str = "", stream=None) -> logging.Handler:
    """Text for people at a terminal; JSON (one object a line, with `trace_id`,
    `span_id` and `request_id` on every line written for a request) for log
    pipelines, so that a line leads to its trace in Jaeger and back."""
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(trace_id)s %(span_id)s %(request_id)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"service": service} if service else None,
        ))
        handler.addFilter(_RequestFields())
    elif fmt == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    return handler


def configure_logging(level: str = "INFO", fmt: str = "text", service: str = "") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), handlers=[log_handler(fmt, service)], force=True
    )


def write_ready_file(path: str | None, running: RunningServer) -> None:
    """Tells a launcher (chorus serve, tests) the bound address once the server is SERVING.

    Written atomically, so a reader never sees half a file.
    """
    if not path:
        return
    import json
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"address": running.address, "port": running.port, "pid": os.getpid(), **running.endpoints}, f)
    os.replace(tmp, path)
