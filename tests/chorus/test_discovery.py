"""Discovery: a target list where a name may stand for many peers (a headless
Service), resolved and kept current, and spread over by the token server's codec pool."""

from __future__ import annotations

import asyncio
import socket

from chorus.rpc.discovery import EndpointSet
from services.token_server.codec_pool import CodecPool


def test_literal_addresses_are_kept_and_an_unresolvable_name_gives_no_endpoint():
    async def scenario():
        endpoints = EndpointSet(["127.0.0.1:50099", "nowhere.invalid:50051", "[::1]:50098"])
        await endpoints.start(interval_s=3600)
        try:
            return endpoints.endpoints()
        finally:
            await endpoints.close()

    assert asyncio.run(scenario()) == ["127.0.0.1:50099", "[::1]:50098"]


def test_a_name_resolves_to_each_of_its_addresses_once():
    async def scenario():
        # The machine's own name resolves without a network; listed twice, kept once.
        name = f"{socket.gethostname()}:50053"
        endpoints = EndpointSet([name, name])
        await endpoints.start(interval_s=3600)
        try:
            return endpoints.endpoints()
        finally:
            await endpoints.close()

    found = asyncio.run(scenario())
    assert found and len(found) == len(set(found))
    assert all(e.endswith(":50053") for e in found)


def test_codec_pool_spreads_streams_over_every_address_a_name_resolves_to():
    async def scenario():
        # "localhost" is taken literally; a DNS name with several addresses is what a
        # headless Service gives. The machine's own name resolves without a network.
        pool = CodecPool([f"{socket.gethostname()}:50053", "127.0.0.1:50099"])
        await pool.start()
        workers = pool.endpoints.endpoints()
        picks = []
        for _ in range(len(workers) * 2):
            w = pool.pick()
            pool.open(w).cancel()
            picks.append(w)
        await pool.close()
        return workers, picks

    workers, picks = asyncio.run(scenario())
    assert "127.0.0.1:50099" in workers and len(workers) >= 2
    # Least in-flight: every endpoint gets a stream before any gets a second.
    assert set(picks[: len(workers)]) == set(workers)
