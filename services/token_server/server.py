"""Builds the token server: backbone, engine, codec pool, gRPC service.

`start_server(config, port=0)` is the one factory `__main__` and the tests share.
"""

from __future__ import annotations

import asyncio
import logging

from chorus.proto.tts.v1 import token_server_pb2, token_server_pb2_grpc
from chorus.realtime.capacity import RealTimeCapacity, calibration_summary
from chorus.rpc.serving import RunningServer, new_server, serve_with_health
from chorus.security.access import AccessPolicy
from chorus.security.tls import ChannelSecurity
from chorus.telemetry.tiers import CODEC_WORKER
from chorus.speech.limits import REFERENCE_MESSAGE_BYTES
from services.token_server import metrics
from services.token_server.codec_pool import CodecPool
from services.token_server.config import TokenServerConfig
from services.token_server.engine import Engine, token_seconds
from services.token_server.llama_backend import LlamaBackbone
from services.token_server.prompts import prompts_for
from services.token_server.servicer import TokenServicer, capacity_streams

log = logging.getLogger(__name__)

SERVICE_NAME = token_server_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name


async def start_server(config: TokenServerConfig, port: int = 0) -> RunningServer:
    # Loading the model maps hundreds of MB: keep it off the event loop.
    backbone = await asyncio.to_thread(
        LlamaBackbone,
        config.model_path,
        n_ctx=config.slots * config.ctx_per_slot,
        n_batch=config.n_batch,
        n_seq_max=config.slots,
        threads=config.llama_threads,
        gpu_layers=config.gpu_layers,
    )
    # Which family the GGUF is, read from its vocabulary (a scan of every token).
    prompts = await asyncio.to_thread(prompts_for, backbone, config.voices, config.voice_store, config.phoneme_language)
    family = prompts.family
    log.info("backbone family: %s (codec %s)", family.name, family.codec)
    pool = CodecPool(config.codec_workers, ChannelSecurity(config.tls, CODEC_WORKER), codec=family.codec)
    await pool.start()
    engine = Engine(
        backbone, config.slots, config.n_batch, config.queue_size, config.ctx_per_slot,
        on_decode=metrics.BATCH_TOKENS.observe,
        capacity=RealTimeCapacity(token_seconds(family), config.slots, config.capacity_margin,
                                  enforce=config.realtime_admission),
        pace_lead_s=config.pace_lead_s,
        codec_streams_limit=pool.streams_limit,
        codec_streams_open=pool.open_streams,
        family=family,
    )
    engine.start()
    measured = await asyncio.wrap_future(engine.run_in_engine(lambda e: e.calibrate())) if config.calibrate else None
    log.info("%s", calibration_summary(measured, engine.capacity))

    policy = AccessPolicy(
        allowed_clients=config.allowed_clients if config.tls else (),
        max_streams_per_client=config.max_streams_per_client,
        max_request_bytes=REFERENCE_MESSAGE_BYTES,  # a reference to encode is the largest message
        on_refused=lambda reason: metrics.RPC.refused_calls.labels(reason).inc(),
    )
    server = new_server(metrics.RPC, policy)
    token_server_pb2_grpc.add_TokenServiceServicer_to_server(TokenServicer(config, engine, pool, prompts), server)
    credentials = config.tls.server_credentials(require_client_cert=True) if config.tls else None
    running = await serve_with_health(server, [SERVICE_NAME], port, config.host, credentials)
    running.components.update(engine=engine, backbone=backbone, codec_pool=pool)
    # SERVING only while a codec worker is (or none is configured: codes only).
    pool.on_availability = lambda available: running.set_condition("codec_workers", available)
    await running.set_condition("codec_workers", pool.available())

    def engine_died(error: BaseException) -> None:
        log.error("the token engine died (%s): NOT_SERVING", error)
        asyncio.ensure_future(running.set_serving(False))

    engine.bridge.on_death(engine_died)
    gauges = asyncio.create_task(_publish_load(engine, pool))

    async def release() -> None:
        gauges.cancel()
        await asyncio.to_thread(engine.stop)
        await pool.close()
        backbone.close()

    running.on_stop.append(release)
    await running.set_serving(True)
    return running


async def _publish_load(engine: Engine, pool: CodecPool, interval_s: float = 0.5) -> None:
    """Slot, queue and capacity gauges, sampled: the engine thread never touches them."""
    while True:
        busy, waiting = engine.load()
        capacity = capacity_streams(engine, pool)
        metrics.SLOTS_BUSY.set(busy)
        metrics.QUEUE_DEPTH.set(waiting)
        metrics.ACTIVE_STREAMS.set(busy)
        metrics.CAPACITY_STREAMS.set(capacity)
        metrics.CAPACITY_HEADROOM.set(capacity - busy - waiting)
        await asyncio.sleep(interval_s)
