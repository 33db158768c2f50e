"""Tracing of the HTTP port: every request but `/health` gets a standard HTTP SERVER
span from opentelemetry-instrumentation-asgi (pinned with the SDK), the way every
gRPC call gets one from the gRPC instrumentation.

- Attributes are the stable HTTP semantic conventions (`http.request.method`,
  `url.path`, `url.scheme`, `http.route`, `http.response.status_code`,
  `user_agent.original`, `client.address`...): the library writes the older names
  (`http.method`, `http.target`) unless `OTEL_SEMCONV_STABILITY_OPT_IN` asks for
  `http`, so that is the default here (an operator's own value is kept).
- The span is named `METHOD route` for the gateway's routes and `METHOD` alone for
  anything else, so a scan of made-up paths cannot grow the set of span names.
- `traceparent` from the client continues its trace (the library extracts it).
- The speech handler tags this span with `chorus.request_id` (`telemetry.tag_request`),
  as the gRPC doors tag theirs; the access middleware (`access.HttpGuard`) sets the
  error status where the HTTP status cannot say it: a client that went away
  mid-response (`CANCELLED`, with a "client disconnected" event), a stream that failed
  after its 200.
- Per-chunk `send`/`receive` spans are left out: a stream of audio would make
  hundreds of them.
"""

from __future__ import annotations

import os

from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.util.http import ExcludeList
from starlette.types import ASGIApp, Scope

from chorus.telemetry.grpc_instrumentation import current_tracer_provider
from gateway.frontends.openai_http.access import OPEN_PATHS, ROUTES

_SCOPE = "opentelemetry.instrumentation.asgi"
_ROUTES = frozenset({*ROUTES, *(f"GET {path}" for path in OPEN_PATHS)})


def _span_details(scope: Scope) -> tuple[str, dict]:
    method = scope.get("method", "HTTP")
    route = f"{method} {scope.get('path', '')}"
    if route in _ROUTES:
        return route, {"http.route": scope["path"]}
    return method, {}


def traced(app: ASGIApp) -> ASGIApp:
    """`app` behind the standard ASGI tracing middleware, set up as the docstring says."""
    # Read once, when the first instrumentation is built: before that, not after.
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    return OpenTelemetryMiddleware(
        app,
        excluded_urls=ExcludeList([r"^https?://[^/]+/health(\?|$)"]),  # probes, as gRPC health is not traced
        default_span_details=_span_details,
        tracer_provider=current_tracer_provider(_SCOPE),
        exclude_spans=["receive", "send"],
    )
