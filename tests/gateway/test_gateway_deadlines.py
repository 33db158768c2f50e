"""Deadlines and cancellation travel down: the fakes generate without end, so a deadline
always expires mid-stream, whatever the machine's speed.
"""

from __future__ import annotations

import grpc
import pytest

from chorus.proto.tts.v1 import gateway_pb2

from fake_token_server import FakeTokenService, PCM, collect, gateway, run, token_server, wait_until

pytestmark = pytest.mark.serial  # judges real time: runs alone (pyproject.toml's markers)


def test_client_deadline_is_passed_down():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address], request_deadline_s=600) as stub:
            await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello."), timeout=30))
            await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello.")))
        with_deadline, without = fake.time_remaining
        # (gRPC rounds timeouts on the wire up to a coarser unit, hence the slack.)
        assert 0 < with_deadline <= 31
        assert 500 < without <= 601  # the gateway's default applies

    run(scenario())


def test_expired_deadline_is_deadline_exceeded_and_stops_generation():
    async def scenario():
        fake = FakeTokenService(endless=True, frame_delay_s=0.01)
        async with token_server(fake) as address, gateway([address]) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello.", audio=PCM), timeout=0.5))
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until(lambda: fake.active == 0, "the token server's call to end")
            assert len(fake.requests) == 1

    run(scenario())


def test_client_going_away_cancels_generation():
    async def scenario():
        fake = FakeTokenService(endless=True, frame_delay_s=0.01)
        async with token_server(fake) as address, gateway([address]) as stub:
            call = stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello.", audio=PCM))
            await call.read()  # audio is flowing
            call.cancel()
            await wait_until(lambda: fake.cancelled == 1 and fake.active == 0, "the token server's call to end")

    run(scenario())
