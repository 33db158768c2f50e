"""The one exception the gateway's logic raises: a gRPC status and what to do about it.

Plain modules (validation, routing, the pipeline) raise it; the servicer turns it into
the call's status, so the status a client sees is decided where the problem is known.
"""

from __future__ import annotations

import logging

import grpc

log = logging.getLogger(__name__)


class GatewayError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def invalid(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message)


async def abort_with(context: grpc.aio.ServicerContext, err: GatewayError) -> None:
    """Ends a gRPC call with `err`'s status (server faults are logged)."""
    if err.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS):
        log.error("request failed: %s", err)
    await context.abort(err.code, err.message)
