"""`python -m chorus.rpc.probe --tier chorus-token-server --port 50052`: a health check
that speaks the service's own TLS, for Kubernetes exec probes.

The kubelet's built-in gRPC probe cannot do TLS, and once a token server or codec
worker requires client certificates nothing without one gets past the handshake. So
with TLS on, the pod probes itself with this, presenting its own certificate (the
same CHORUS_TLS_* environment the service reads): health is open to any certificate
from the cluster's CA, whatever tier it names. Without TLS it checks in plaintext.

Exit status 0 when the service answers SERVING, 1 otherwise (with the reason).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chorus.rpc.addresses import dial_address
from chorus.security.tls import TIERS, TlsFiles


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m chorus.rpc.probe", description=__doc__.split("\n\n")[1])
    p.add_argument("--tier", choices=TIERS, required=True, help="the service probed: its certificate names it")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--service", default="", help="health service name; default: the whole server")
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--tls-cert", default=env("CHORUS_TLS_CERT"), help="[CHORUS_TLS_CERT]")
    p.add_argument("--tls-key", default=env("CHORUS_TLS_KEY"), help="[CHORUS_TLS_KEY]")
    p.add_argument("--tls-ca", default=env("CHORUS_TLS_CA"), help="[CHORUS_TLS_CA]")
    return p.parse_args(argv)


def check(args: argparse.Namespace) -> str:
    """The service's health status name; raises grpc.RpcError or ValueError."""
    target = dial_address(args.host, args.port)
    tls = TlsFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca)
    if tls is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, tls.channel_credentials(),
                                      options=[("grpc.ssl_target_name_override", args.tier)])
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        status = check(args)
    except grpc.RpcError as err:
        print(f"{args.tier} at {args.host}:{args.port}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"probe: {err}", file=sys.stderr)
        return 1
    print(f"{args.tier} at {args.host}:{args.port}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
