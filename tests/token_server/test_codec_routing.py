"""A token server opens decode streams only on codec workers that decode its codec.

CodecPool against real gRPC servers whose GetLoad lists codecs as a worker of another
model family would, or lists none, as a worker from before the field does."""

from __future__ import annotations

import asyncio

import pytest

from chorus.proto.tts.v1 import codec_pb2, codec_pb2_grpc
from chorus.speech import codecs, orpheus
from services.token_server.codec_pool import NoCodecWorkerError

from codec_load_servers import pool_over

OTHER = "neucodec_24khz"


class _Load(codec_pb2_grpc.CodecServiceServicer):
    def __init__(self, listed: tuple[str, ...], capacity: int) -> None:
        self.listed, self.capacity = listed, capacity

    async def GetLoad(self, request, context):
        return codec_pb2.GetLoadResponse(max_streams=8, capacity_streams=self.capacity, device="cpu",
                                         codecs=list(self.listed))


def pool_of(workers: list[tuple[tuple[str, ...], int]], codec: str = orpheus.CODEC):
    return pool_over([_Load(listed, capacity) for listed, capacity in workers], codec=codec)


def test_the_orpheus_codec_is_snac_and_an_empty_field_means_it():
    assert orpheus.CODEC == codecs.SNAC_24KHZ == codecs.requested("")
    assert codecs.declared([]) == {codecs.SNAC_24KHZ}
    assert codecs.declared([OTHER]) == {OTHER}


def test_streams_and_room_go_only_to_workers_of_the_servers_codec():
    async def scenario():
        # Worker 0 decodes another family's codec and is the least loaded of all (first
        # in endpoint order); worker 1 is from before the field (SNAC); worker 2 lists both.
        async with pool_of([((OTHER,), 5), ((), 2), ((OTHER, codecs.SNAC_24KHZ), 3)]) as (pool, addresses):
            first = pool.pick()
            after_1 = pool.pick({addresses[1]})
            with pytest.raises(NoCodecWorkerError) as none_left:
                pool.pick({addresses[1], addresses[2]})
            return addresses, first, after_1, none_left.value, pool.streams_limit(), pool.unavailable_reason()

    addresses, first, after_1, none_left, limit, reason = asyncio.run(scenario())
    assert first == addresses[1] and after_1 == addresses[2]
    assert "no other codec worker decodes snac_24khz" in str(none_left) and OTHER in str(none_left)
    assert limit == 2 + 3  # worker 0's room is not this server's
    assert reason is None


def test_a_pool_of_only_other_codecs_is_unavailable_with_the_reason():
    async def scenario():
        async with pool_of([((OTHER,), 4)]) as (pool, _):
            with pytest.raises(NoCodecWorkerError) as err:
                pool.pick()
            return pool.streams_limit(), pool.unavailable_reason(), pool.available(), str(err.value)

    limit, reason, available, err = asyncio.run(scenario())
    assert limit == 0 and not available
    assert reason == f"none of this token server's codec workers decodes snac_24khz (they decode {OTHER}); try another"
    assert "snac_24khz" in err


def test_a_server_of_another_codec_takes_only_its_workers():
    async def scenario():
        async with pool_of([((), 4), ((OTHER,), 3)], codec=OTHER) as (pool, addresses):
            return addresses, pool.pick(), pool.streams_limit()

    addresses, picked, limit = asyncio.run(scenario())
    assert picked == addresses[1] and limit == 3
