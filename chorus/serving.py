"""What every Chorus gRPC server shares: health, reflection, SIGTERM drain.

Each service's `start_server(config, port=0)` builds its servicers, then hands the
`grpc.aio.Server` to `serve_with_health` so that the three services behave alike
when probed, reflected or terminated.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chorus.call_guard import CallGuard

log = logging.getLogger(__name__)

# Large enough for a few seconds of PCM in one message.
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


class StartupError(Exception):
    """A server cannot start for a reason its operator must fix (a port in use)."""


@dataclass
class RunningServer:
    """A started server: its port, its health servicer, and how to stop it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # The service's engine objects, for in-process tests and introspection.
    components: dict[str, object] = field(default_factory=dict)
    # Counts the calls in flight, for the drain (None for a server not made by new_server).
    guard: CallGuard | None = None
    _stopped: bool = False
    # What must hold for SERVING, by name: "ready" (warm-up done), and e.g. "upstream".
    _conditions: dict[str, bool] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

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
        if self.guard is not None and grace:
            self.guard.drain()
            try:
                await asyncio.wait_for(self.guard.wait_idle(), grace)
            except TimeoutError:
                log.warning("%d calls still in flight after the %.1fs drain; cancelling them",
                            self.guard.in_flight, grace)
            await self.server.stop(0)
        else:
            await self.server.stop(grace)
        for hook in reversed(self.on_stop):
            await hook()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def serve_with_health(
    server: grpc.aio.Server,
    service_names: Iterable[str],
    port: int,
    host: str = "127.0.0.1",
) -> RunningServer:
    """Adds health and reflection, binds, starts, and reports NOT_SERVING until the
    caller marks the server ready (after warm-up)."""
    names = tuple(service_names)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc says only "Failed to bind"
        bound = 0
    if bound == 0:
        raise StartupError(
            f"cannot listen on {host}:{port}: the address is in use or not available on this host "
            "(choose another --port or --host, or stop what holds it)"
        )
    await server.start()
    running = RunningServer(server=server, port=bound, health=health_servicer, service_names=names,
                            guard=getattr(server, "chorus_guard", None))
    await running.set_serving(False)
    return running


def new_server() -> grpc.aio.Server:
    """A grpc.aio server whose every call passes the CallGuard (request parsing, drain)."""
    guard = CallGuard()
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=[guard])
    server.chorus_guard = guard  # serve_with_health hands it to the RunningServer
    return server


async def run_until_signalled(running: RunningServer, grace: float) -> None:
    """Serves until SIGTERM or SIGINT, then drains: NOT_SERVING, finish streams, stop."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await stop_requested.wait()
    log.info("signal received: draining for up to %.1fs", grace)
    await running.stop(grace)


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
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
        json.dump({"address": running.address, "port": running.port, "pid": os.getpid()}, f)
    os.replace(tmp, path)
