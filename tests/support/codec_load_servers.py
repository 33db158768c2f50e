"""A started CodecPool over real gRPC servers that answer GetLoad as a test says, so
that what the pool does with a worker's answer is checked over the real wire."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import grpc

from chorus.proto.tts.v1 import codec_pb2_grpc
from services.token_server.codec_pool import CodecPool


@contextlib.asynccontextmanager
async def pool_over(servicers: Sequence[codec_pb2_grpc.CodecServiceServicer], **pool_options):
    """Yields (pool, the workers' addresses in the order of `servicers`)."""
    servers, addresses = [], []
    for servicer in servicers:
        server = grpc.aio.server()
        codec_pb2_grpc.add_CodecServiceServicer_to_server(servicer, server)
        addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        await server.start()
        servers.append(server)
    pool = CodecPool(addresses, **pool_options)
    try:
        await pool.start()
        yield pool, addresses
    finally:
        await pool.close()
        for server in servers:
            await server.stop(None)
