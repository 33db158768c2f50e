"""The RPC layer's exception types, in a leaf module (no chorus imports) so that any
module, telemetry included, can raise them without importing the server plumbing."""

from __future__ import annotations


class StartupError(Exception):
    """A server cannot start for a reason its operator must fix (a port in use)."""
