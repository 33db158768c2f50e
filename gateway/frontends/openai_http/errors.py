"""OpenAI's error shape for every answer of the HTTP port that is not audio, with the
HTTP status of the gRPC code the gateway's logic (or its access policy) gave."""

from __future__ import annotations

import grpc
from starlette.responses import JSONResponse

from chorus.security.access import Refusal
from gateway.errors import GatewayError
from gateway.frontends import shell

_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               408: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
               429: "rate_limit_error"}


def error_response(err: GatewayError, status: int | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    status = status or shell.http_status(err.code)
    return JSONResponse(
        {"error": {"message": err.message, "type": _ERROR_TYPE.get(status, "server_error"), "param": None,
                   "code": err.code.name.lower()}},
        status_code=status,
        # RFC 6750: a 401 names the scheme that would have worked.
        headers={**(headers or {}), **({"WWW-Authenticate": "Bearer"} if status == 401 else {})} or None,
    )


def refusal_response(refusal: Refusal, status: int | None = None) -> JSONResponse:
    """The answer to a call the access policy refused (`status` overrides the code's, as 413 does)."""
    return error_response(GatewayError(grpc.StatusCode[refusal.code.name], refusal.message), status)
