"""Bounds on the identifiers a request carries, for every service that checks them.

A request id travels into logs, spans and downstream calls, so the gateway and the
token server (which can be called directly) bound it alike: a megabyte of id, or a
newline that forges a log line, stops at the first service that reads it.
"""

from __future__ import annotations

MAX_REQUEST_ID_CHARS = 128
# The gateway names each piece of a long text "<id>.<index>"; the token server
# accepts that suffix on top of a client's longest id.
PIECE_SUFFIX_CHARS = 12


def request_id_problem(request_id: str, limit: int = MAX_REQUEST_ID_CHARS) -> str | None:
    """Why `request_id` is refused, or None."""
    if len(request_id) > limit:
        return f"request_id is {len(request_id)} characters; at most {limit}"
    if not request_id.isprintable():
        return "request_id has control characters (newlines, tabs, ...); use printable text"
    return None
