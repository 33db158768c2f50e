"""host:port strings for listeners and for the clients that dial them, in one place.

A server binds what it was told (`--host ::` is every interface), but a wildcard
is not an address a client can dial, and an IPv6 host needs brackets before its
port ("::1:8080" is not an address). Three formatters once did this apart and
disagreed: the gateway reported its HTTP port as "::1:PORT", and as IPv4 loopback
for a server listening on "::".
"""

from __future__ import annotations

# Hosts that mean "every interface" to a listener.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def listen_address(host: str, port: int) -> str:
    """What a server binds: `host` as given (wildcards kept), an IPv6 host in brackets."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def dial_address(host: str, port: int) -> str:
    """Where a client on this machine dials a listener bound to `host`: its own
    interface, or loopback of the listener's family for a wildcard ("::" -> "[::1]").
    "localhost" dials IPv4 loopback: it may resolve to either family, and every
    Chorus listener given "localhost" holds 127.0.0.1."""
    host = host.strip("[]")
    if host in WILDCARD_HOSTS or host == "localhost":
        host = "::1" if host == "::" else "127.0.0.1"
    return listen_address(host, port)
