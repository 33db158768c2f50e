"""Reading a JSON body on the HTTP port, for every route that takes one.

Only `application/json` is read: a form or text/plain body is what any web page can
make a visitor's browser send without a preflight, so it must never start work. The
body must arrive whole within `http_read_timeout_s` (a client that stops sending gets
408 and its connection closed), and every string in it must be valid Unicode (JSON's
escapes can spell an unpaired surrogate, which nothing downstream can encode).
"""

from __future__ import annotations

import asyncio
import json

import grpc
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import GatewayError, invalid
from gateway.frontends.openai_http.errors import error_response

# Bodies from this size on are parsed off the event loop.
LARGE_BODY_BYTES = 256 * 1024


async def json_body(request: Request, read_timeout_s: float, shape: str = "") -> object | Response:
    """The body parsed, or the error response to send instead. `shape` (an example
    body) is added to the message when the content type is wrong."""
    content_type = request.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != "application/json":
        return error_response(invalid(
            f"the body must be JSON sent as `Content-Type: application/json`, got {content_type or 'none'!r}"
            + (f": {shape}" if shape else "")
        ), 415)
    try:
        async with asyncio.timeout(read_timeout_s):
            raw = await request.body()
    except TimeoutError:
        # The rest of the body may never come: the connection is not reused.
        late = GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, (
            f"the body did not arrive within {read_timeout_s:g} s "
            "(--http-read-timeout): send it whole, with a Content-Length that matches it"))
        return error_response(late, 408, headers={"Connection": "close"})
    try:
        # A speech body is kilobytes; a voice's recording in base64 is up to 21 MB, whose
        # parsing would stall every stream this event loop relays.
        return parse_json(raw) if len(raw) < LARGE_BODY_BYTES else await asyncio.to_thread(parse_json, raw)
    except GatewayError as err:
        return error_response(err)


def parse_json(raw: bytes) -> object:
    """The body as JSON (its size is HttpGuard's to limit), every string in it valid Unicode."""
    try:
        body = json.loads(raw)
        json.dumps(body, ensure_ascii=False).encode()
    except RecursionError:
        raise invalid("the body nests too deeply: it is a JSON object of fields (`sampling` one level down)") from None
    except UnicodeEncodeError as err:
        bad = err.object[err.start:err.end].encode("unicode_escape").decode()
        raise invalid(f"the body holds an unpaired UTF-16 surrogate ({bad}): every string must be valid Unicode "
                      "(a \\ud800-\\udbff escape must be followed by a \\udc00-\\udfff one)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise invalid(f"the body is not JSON: {err}") from None
    return body
