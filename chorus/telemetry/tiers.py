"""The names the three tiers go by, in a leaf module (no chorus imports): a tier's
service name in traces and metrics is also its identity in TLS certificates, so tracing
and TLS both read these without importing each other.
"""

from __future__ import annotations

GATEWAY = "chorus-gateway"
TOKEN_SERVER = "chorus-token-server"
CODEC_WORKER = "chorus-codec-worker"
SERVICES = (GATEWAY, TOKEN_SERVER, CODEC_WORKER)
