"""TLS for every Chorus port and every call between services, off unless configured.

Each service has one certificate (cert-manager's `tls.crt`/`tls.key`, with the CA
bundle `ca.crt`): it is the server certificate of its own port and the client
certificate of its calls to the next tier, so one Secret per tier is all a cluster
needs. Each tier's certificate carries its tier name (`chorus-gateway`,
`chorus-token-server`, `chorus-codec-worker`) as a DNS SAN; that is the identity the
next tier checks.

Calls go to the addresses discovery resolved (one channel per pod IP), not to the
name in the certificate, so outgoing channels verify the server against its tier
name (`grpc.ssl_target_name_override`): a token server only talks to a peer that
proves it is a codec worker, whatever IP it sits on.

The files are read when a credential is built, that is at start: a renewed
certificate takes effect at the next (rolling) restart.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc

from chorus.telemetry.tiers import CODEC_WORKER, GATEWAY, TOKEN_SERVER

# A tier's identity is its service name, so traces and certificates say the same.
TIERS = (GATEWAY, TOKEN_SERVER, CODEC_WORKER)
# Who may call each tier by default once mTLS is on: only the tier in front of it.
DEFAULT_ALLOWED_CLIENTS = {TOKEN_SERVER: (GATEWAY,), CODEC_WORKER: (TOKEN_SERVER,), GATEWAY: ()}

_PEM_MARKER = b"-----BEGIN "


@dataclass(frozen=True)
class TlsFiles:
    """A service's certificate chain, its private key, and the CA bundle peers must chain to."""

    cert: Path
    key: Path
    ca: Path

    def __post_init__(self) -> None:
        problems = []
        for flag, value in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            path = Path(value)
            object.__setattr__(self, flag.removeprefix("--tls-"), path)
            try:
                with open(path, "rb") as f:
                    head = f.read(64 * 1024)
            except OSError as err:
                problems.append(f"{flag} {path}: {err.strerror or err}")
                continue
            if _PEM_MARKER not in head:
                problems.append(f"{flag} {path} is not a PEM file (no '-----BEGIN' line)")
        if not problems:
            problems += self._check_with_openssl()
        if problems:
            raise ValueError("TLS files: " + "; ".join(problems))

    def _check_with_openssl(self) -> list[str]:
        """gRPC reports a key that does not match its certificate, or a file it cannot
        parse, only as "failed to bind"; the standard library's OpenSSL names the problem."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # An empty password: an encrypted key fails here instead of prompting on a terminal.
            context.load_cert_chain(self.cert, self.key, password=lambda: b"")
        except ssl.SSLError as err:
            return [f"--tls-cert {self.cert} and --tls-key {self.key} do not make a usable pair "
                    f"(an unencrypted PEM key that matches the certificate): {err.reason or err}"]
        try:
            context.load_verify_locations(cafile=self.ca)
        except ssl.SSLError as err:
            return [f"--tls-ca {self.ca} is not a usable CA bundle: {err.reason or err}"]
        return []

    @classmethod
    def from_flags(cls, cert: str | None, key: str | None, ca: str | None) -> TlsFiles | None:
        """None when no TLS flag is set (plaintext, as the local demo runs); all three or an error."""
        given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
        if not any(given.values()):
            return None
        missing = [flag for flag, value in given.items() if not value]
        if missing:
            raise ValueError(
                f"TLS needs --tls-cert, --tls-key and --tls-ca together; missing {', '.join(missing)}"
            )
        return cls(Path(cert), Path(key), Path(ca))

    def server_credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.ca.read_bytes(),
            require_client_auth=require_client_cert,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Verifies servers against the CA and presents this service's certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )


@dataclass(frozen=True)
class ChannelSecurity:
    """How a service's calls to one tier are secured: TLS as that tier, or plaintext."""

    tls: TlsFiles | None = None
    # The tier the server must prove it is (a DNS SAN of its certificate).
    server_name: str = ""

    def aio_channel(
        self, target: str, options: Sequence[tuple[str, object]],
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(target, options=options, interceptors=list(interceptors) or None)
        options = [*options, ("grpc.ssl_target_name_override", self.server_name)]
        return grpc.aio.secure_channel(
            target, self.tls.channel_credentials(), options=options, interceptors=list(interceptors) or None
        )


def certificate_identities(alternative_names: Sequence[str], common_names: Sequence[str]) -> tuple[str, ...]:
    """The identities a verified certificate names: its subject alternative names, or
    its common name when it has none (as hostname checks do, RFC 6125)."""
    return tuple(dict.fromkeys(alternative_names or common_names))


def peer_identities(context: grpc.aio.ServicerContext) -> tuple[str, ...]:
    """The identities the caller's verified client certificate names; empty for a
    plaintext call or a call without a certificate."""
    auth = context.auth_context() or {}

    def names(key: str) -> list[str]:
        return [n.decode("utf-8", "replace") for n in auth.get(key) or ()]

    return certificate_identities(names("x509_subject_alternative_name"), names("x509_common_name"))
