"""host:port for listeners and for the local clients that dial them, and a gateway on
IPv6 loopback that reports an HTTP endpoint a client can use."""

from __future__ import annotations

import asyncio
import socket

import httpx2 as httpx
import pytest

from chorus.rpc.addresses import dial_address, listen_address
from gateway.config import GatewayConfig
from gateway.server import start_server

from fake_token_server import FakeTokenService, token_server


@pytest.mark.parametrize(("host", "listen", "dial"), [
    ("127.0.0.1", "127.0.0.1:8080", "127.0.0.1:8080"),
    ("10.1.2.3", "10.1.2.3:8080", "10.1.2.3:8080"),
    ("0.0.0.0", "0.0.0.0:8080", "127.0.0.1:8080"),
    ("", ":8080", "127.0.0.1:8080"),
    ("localhost", "localhost:8080", "127.0.0.1:8080"),
    ("::", "[::]:8080", "[::1]:8080"),
    ("::1", "[::1]:8080", "[::1]:8080"),
    ("[::1]", "[::1]:8080", "[::1]:8080"),
    ("fd00::7", "[fd00::7]:8080", "[fd00::7]:8080"),
    ("token-server.chorus.svc", "token-server.chorus.svc:8080", "token-server.chorus.svc:8080"),
])
def test_listen_and_dial_addresses(host, listen, dial):
    assert listen_address(host, 8080) == listen
    assert dial_address(host, 8080) == dial


def _ipv6_loopback_missing() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return True
    return False


@pytest.mark.skipif(_ipv6_loopback_missing(), reason="this machine cannot bind IPv6 loopback (::1)")
def test_a_gateway_on_ipv6_loopback_reports_a_bracketed_http_endpoint_that_answers():
    async def scenario():
        async with token_server(FakeTokenService()) as address:
            running = await start_server(GatewayConfig(token_servers=(address,), host="::1", http_port=0), port=0)
            try:
                endpoint = running.endpoints["http"]
                async with httpx.AsyncClient(base_url=f"http://{endpoint}", timeout=30) as client:
                    health = await client.get("/health")
            finally:
                await running.stop(0)
        return endpoint, health

    endpoint, health = asyncio.run(scenario())
    assert endpoint.startswith("[::1]:") and int(endpoint.rpartition(":")[2]) > 0
    assert health.status_code == 200 and health.json() == {"status": "serving"}
