"""Who may use a Chorus door, how much of it, and whether it takes work at all: one
decision, whatever carried the call.

A service has several doors (the gateway: tts.v1 and Riva over gRPC, OpenAI's speech
endpoint and the browser page over HTTP). Each transport has an adapter that
describes a call as a `Knock` and asks `AccessPolicy.admit`; the policy knows no
transport, so a rule cannot be enforced on one door and forgotten on another
(the HTTP port once served audio to callers the gRPC port refused). The adapters
are `chorus.security.auth.CallGuard` (gRPC) and the gateway's ASGI middleware.

`admit` checks, in this order:

1. the client certificate's identity, where the port takes only certain ones (mTLS
   between services) -> PERMISSION_DENIED;
2. the API key, where the port needs one -> UNAUTHENTICATED;
3. the drain: a server that is stopping takes no new work -> UNAVAILABLE (a caller
   then tries another peer) while its port stays open and probes read NOT_SERVING
   (grpc's own stop closes the port first: probes got "connection refused"), and it
   stops once the work in flight is done (RunningServer.stop);
4. the streams the caller already holds, per client and per API key ->
   RESOURCE_EXHAUSTED for that caller only.

Doors that are open (health, reflection, the page) need no key and no identity, so
probes and grpcurl work; a stream held on one (a health Watch) still counts against
its client, because open to probes must not mean open to floods.

Who "a client" is decides whose share a stream spends, so it must be something a
neighbour cannot borrow. A verified certificate identity cannot be: a client is its
identity at its address (every pod of a tier shares one certificate, so the identity
alone would make a whole tier one client). Without one, the service chooses: the
gateway counts by address (its clients are applications, which the per-key limit
tells apart), a service behind it by connection, since every process on a host, or
behind one NAT, shares that host's address (a script on the token server's host
once took the token server's whole codec share). A process's gRPC channels to one
address usually share one connection (gRPC's subchannel pool), and a token server
holds one channel to each worker, so for an honest peer a connection is the process.

The largest request message is the policy's too (`max_request_bytes`): gRPC enforces
it itself, before parsing, from the server's options; the HTTP adapter asks
`check_size` about each body.

Refusals name the reason (`no_api_key`, ...) for the refused-call counters; the key
id, never the secret, is what the caller is known by afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from chorus.security.api_keys import ApiKeys

log = logging.getLogger(__name__)

# What comes in is small (text, code frames), so a server reads at most this per
# request message (gRPC refuses a bigger one with RESOURCE_EXHAUSTED before it is
# parsed) unless its policy says otherwise.
MAX_REQUEST_BYTES = 1024 * 1024

# Reasons a call was refused, as the services' refused-call counters label them.
NOT_ALLOWED = "not_allowed"
NO_KEY = "no_api_key"
BAD_KEY = "bad_api_key"
CLIENT_LIMIT = "client_limit"
KEY_LIMIT = "key_limit"


class Code(enum.Enum):
    """A refusal's status, named as gRPC names it; the HTTP adapter maps it to a status."""

    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"


class Refusal(Exception):
    """A call the policy turns away before any work: its status, why, and what to do."""

    def __init__(self, code: Code, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # The refused-call counter's label; None for refusals that are not about the
        # caller (a drain, a message too large).
        self.reason = reason


class Share(enum.Enum):
    """What one client is, for the per-client stream limit, when it shows no certificate."""

    ADDRESS = "address"
    CONNECTION = "connection"


@dataclass(frozen=True)
class Knock:
    """A call as the policy sees it, whatever carried it."""

    host: str  # the client's address
    connection: str  # its connection (address and port): one per socket while it is open
    identities: tuple[str, ...]  # the verified client certificate's names; empty without one
    secret: str | None  # the API key it presented
    open: bool  # health, reflection, the page: no key, no identity, not work to drain
    holds_stream: bool  # it streams responses: holds a slot or a connection's worth of work for as long as it runs
    method: str  # for the log


@dataclass(frozen=True)
class Caller:
    client: str
    key_id: str | None = None

    @property
    def attributes(self) -> dict[str, str]:
        """Span attributes naming the caller (never the secret)."""
        attributes = {"chorus.client": self.client}
        if self.key_id:
            attributes["chorus.api_key_id"] = self.key_id
        return attributes


class Admission:
    """An admitted call: who made it, and `release()` for when it ends (idempotent)."""

    def __init__(self, caller: Caller, release: Callable[[], None]) -> None:
        self.caller = caller
        self._release = release

    def release(self) -> None:
        release, self._release = self._release, _nothing
        release()


def presented_key(headers: Iterable[tuple[str, object]] | None) -> str | None:
    """The API key in `authorization: Bearer <key>` or `x-api-key: <key>` (gRPC
    metadata or HTTP headers, names in lower case), if any."""
    for key, value in headers or ():
        if not isinstance(value, str):
            continue
        if key == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif key == "x-api-key" and value.strip():
            return value.strip()
    return None


class AccessPolicy:
    """One per server; every door's adapter asks it. Call on the server's event loop."""

    def __init__(
        self,
        *,
        allowed_clients: tuple[str, ...] = (),
        api_keys: ApiKeys | None = None,
        max_streams_per_client: int = 0,
        max_streams_per_key: int = 0,
        share: Share = Share.CONNECTION,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        on_refused: Callable[[str], None] = lambda reason: None,
    ) -> None:
        """`allowed_clients`: certificate identities the port takes (empty: any caller
        the transport let in). Limits of 0 mean none. `max_request_bytes`: the largest
        request message (or HTTP body) read. `on_refused(reason)` counts refusals."""
        self.allowed_clients = tuple(allowed_clients)
        self.api_keys = api_keys
        self.max_streams_per_client = max_streams_per_client
        self.max_streams_per_key = max_streams_per_key
        self.share = share
        self.max_request_bytes = max_request_bytes
        self._on_refused = on_refused
        self._client_streams: collections.Counter[str] = collections.Counter()
        self._key_streams: collections.Counter[str] = collections.Counter()
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self, knock: Knock) -> Admission:
        """Admits the call or raises Refusal; see the module docstring for the order."""
        identity = self._identity(knock)
        caller = Caller(self._client(knock, identity))
        if self.allowed_clients and identity not in self.allowed_clients and not knock.open:
            shown = ", ".join(knock.identities) or "none (no client certificate)"
            self._refuse(Refusal(
                Code.PERMISSION_DENIED,
                f"this port takes calls only from {', '.join(self.allowed_clients)} (--allowed-clients); "
                f"the client certificate names {shown}",
                NOT_ALLOWED,
            ), caller)
        if self.api_keys is not None and not knock.open:
            caller = Caller(caller.client, self._key_id(knock.secret, caller))
        if self.draining and not knock.open:
            raise Refusal(Code.UNAVAILABLE, "this server is draining before it stops; send the call to another")
        if knock.holds_stream:
            self._check_streams(caller)
        return self._hold(knock, caller)

    def check_size(self, size: int) -> None:
        """Refuses a request message or body over `max_request_bytes`."""
        if size > self.max_request_bytes:
            raise Refusal(
                Code.RESOURCE_EXHAUSTED,
                f"the request is {size} bytes or more; this server reads at most {self.max_request_bytes} bytes",
            )

    def drain(self) -> None:
        """From now on, new work is refused (open doors still answer)."""
        self.draining = True

    async def wait_idle(self) -> None:
        """Returns once no work is in flight."""
        await self._idle.wait()

    def _identity(self, knock: Knock) -> str | None:
        """The certificate identity the call is known by: an allowed one if it names one."""
        allowed = [i for i in knock.identities if i in self.allowed_clients]
        return (allowed or list(knock.identities) or [None])[0]

    def _client(self, knock: Knock, identity: str | None) -> str:
        if identity:
            return f"{identity}@{knock.host}"
        return knock.host if self.share is Share.ADDRESS else knock.connection

    def _key_id(self, secret: str | None, caller: Caller) -> str:
        if secret is None:
            self._refuse(Refusal(
                Code.UNAUTHENTICATED,
                "this server needs an API key: send `authorization: Bearer <key>` (or `x-api-key: <key>`)",
                NO_KEY,
            ), caller)
        key_id = self.api_keys.lookup(secret)
        if key_id is None:
            self._refuse(Refusal(
                Code.UNAUTHENTICATED, "the API key is not valid (mistyped, revoked or rotated); ask for a current key",
                BAD_KEY,
            ), caller)
        return key_id

    def _check_streams(self, caller: Caller) -> None:
        client_limit, key_limit = self.max_streams_per_client, self.max_streams_per_key
        if client_limit and self._client_streams[caller.client] >= client_limit:
            self._refuse(Refusal(
                Code.RESOURCE_EXHAUSTED,
                f"client {caller.client} already holds {client_limit} streams, the most one client may hold "
                "at once; wait for one to finish",
                CLIENT_LIMIT,
            ), caller)
        if caller.key_id and key_limit and self._key_streams[caller.key_id] >= key_limit:
            self._refuse(Refusal(
                Code.RESOURCE_EXHAUSTED,
                f"API key {caller.key_id} already holds {key_limit} streams, the most one key may hold "
                "at once; wait for one to finish",
                KEY_LIMIT,
            ), caller)

    def _hold(self, knock: Knock, caller: Caller) -> Admission:
        """Counts what the call holds: its place in the drain, its streams."""
        if not knock.open:
            self.in_flight += 1
            self._idle.clear()
        if knock.holds_stream:
            self._client_streams[caller.client] += 1
            if caller.key_id:
                self._key_streams[caller.key_id] += 1
            # The gateway's access log names the key; inside the cluster it would only repeat the tier.
            log.log(logging.INFO if caller.key_id else logging.DEBUG, "%s from %s%s", knock.method, caller.client,
                    f" with key {caller.key_id}" if caller.key_id else "")

        def release() -> None:
            if knock.holds_stream:
                _decrement(self._client_streams, caller.client)
                if caller.key_id:
                    _decrement(self._key_streams, caller.key_id)
            if not knock.open:
                self.in_flight -= 1
                if self.in_flight == 0:
                    self._idle.set()

        return Admission(caller, release)

    def _refuse(self, refusal: Refusal, caller: Caller) -> None:
        self._on_refused(refusal.reason)
        level = logging.WARNING if refusal.reason == NOT_ALLOWED else logging.INFO
        log.log(level, "refused a call from %s%s: %s", caller.client,
                f" with key {caller.key_id}" if caller.key_id else "", refusal.message)
        raise refusal


def _nothing() -> None:
    pass


def _decrement(counts: collections.Counter[str], name: str) -> None:
    counts[name] -= 1
    if counts[name] <= 0:
        del counts[name]
