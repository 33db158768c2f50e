"""The one exception the gateway's logic raises: a gRPC status and what to do about it.

Plain modules (validation, routing, the pipeline) raise it; each door turns it into
the call's status (gateway.frontends.shell), so the status a client sees is decided
where the problem is known.
"""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def invalid(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message)

