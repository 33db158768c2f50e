"""The gateway's composition root: builds the router, the pipeline and the doors
(gateway/frontends: tts.v1 and Riva on the gRPC port, OpenAI's endpoint and the page
on the HTTP port), registers them behind one access policy, and starts serving.

Nothing about a request is decided here; the doors and the logic below them do that.
"""

from __future__ import annotations

import logging

from chorus.proto.riva import riva_tts_pb2_grpc
from chorus.proto.tts.v1 import gateway_pb2_grpc
from chorus.rpc.addresses import dial_address
from chorus.rpc.serving import RunningServer, new_server, serve_with_health
from chorus.security.access import AccessPolicy, Share
from chorus.security.api_keys import ApiKeys
from chorus.security.tls import ChannelSecurity
from chorus.telemetry.tiers import TOKEN_SERVER
from gateway import metrics
from gateway.config import GatewayConfig
from gateway.frontends.openai_http.app import HttpListener, SpeechEndpoint
from gateway.frontends.riva.servicer import SERVICE_NAME as RIVA_SERVICE_NAME
from gateway.frontends.riva.servicer import RivaSynthesisServicer
from gateway.frontends.tts_v1 import SERVICE_NAME, SynthesisServicer
from gateway.pipeline import Pipeline
from gateway.router import Router

log = logging.getLogger(__name__)


async def start_server(config: GatewayConfig, port: int = 0) -> RunningServer:
    """Starts the gateway on `port` (0 picks one) and marks it SERVING; its HTTP port
    (when configured) shares the gRPC port's access policy, certificate and drain."""
    policy = AccessPolicy(
        allowed_clients=config.allowed_clients,
        api_keys=ApiKeys(config.api_keys_file) if config.api_keys_file else None,
        max_streams_per_client=config.max_streams_per_client,
        max_streams_per_key=config.max_streams_per_key,
        share=Share.ADDRESS,
        max_request_bytes=config.max_request_bytes,
        on_refused=lambda reason: metrics.RPC.refused_calls.labels(reason).inc(),
    )
    router = Router(
        config.token_servers, config.status_interval_s, ChannelSecurity(config.tls, TOKEN_SERVER), config.stall
    )
    await router.start()
    server = new_server(metrics.RPC, policy)
    pipeline = Pipeline(router, config.lookahead_segments)
    gateway_pb2_grpc.add_SynthesisServiceServicer_to_server(SynthesisServicer(config, pipeline), server)
    riva_tts_pb2_grpc.add_RivaSpeechSynthesisServicer_to_server(RivaSynthesisServicer(config, pipeline), server)
    credentials = config.tls.server_credentials(require_client_cert=bool(config.allowed_clients)) if config.tls else None
    try:
        running = await serve_with_health(server, [SERVICE_NAME, RIVA_SERVICE_NAME], port, config.host, credentials)
    except BaseException:
        await router.close()
        raise
    # SERVING only while a token server is reachable and SERVING.
    router.on_availability = lambda available: running.set_condition("token_servers", available)
    await running.set_condition("token_servers", router.available())
    running.on_stop.append(router.close)
    if config.http_port is not None:
        endpoint = SpeechEndpoint(config, pipeline, lambda: running.serving)
        try:
            http = await HttpListener.start(
                endpoint.app(policy, metrics.RPC), config.host, config.http_port, config.tls,
                require_client_cert=bool(config.allowed_clients), read_timeout_s=config.http_read_timeout_s,
                finish=endpoint.finish,
            )
        except BaseException:
            await running.stop(0)
            raise
        running.on_drain.append(http.drain)
        running.endpoints["http"] = dial_address(config.host, http.port)
        log.info("gateway %s (OpenAI /v1/audio/speech, page at /) on %s:%d", "HTTPS" if config.tls else "HTTP",
                 config.host, http.port)
    await running.set_serving(True)
    log.info("gateway serving on %s:%d, token servers %s", config.host, running.port, ", ".join(config.token_servers))
    return running
