"""Issue 19 item 6, observability without blind spots: each gap seen live, against
real servers on 127.0.0.1:0 and the in-process OTLP receiver (tests/support/otlp_receiver.py).

- HTTP calls are in `chorus_gateway_requests_total`, told apart by `api`, and so are
  Riva's and tts.v1's `Synthesize` (gaps 1, 2);
- a cancelled or expired call's CLIENT span is an error, as its SERVER span is (gap 3);
- an HTTP request its client cut off is an error with an event (gap 4);
- HTTP spans carry the semantic-convention `http.*` attributes and the request id (gap 5);
- the standard OTEL_* variables are honoured, Chorus's own endpoint first (gap 6);
- `chorus serve --metrics-port BASE` (or CHORUS_METRICS_PORT) spreads the services'
  metrics ports, and every service's /metrics has the process metrics (gaps 7, 8).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from chorus.proto.riva import riva_audio_pb2, riva_tts_pb2, riva_tts_pb2_grpc
from chorus.proto.tts.v1 import gateway_pb2, gateway_pb2_grpc
from chorus.rpc.serving import new_channel, new_server
from chorus.telemetry import tracing
from fake_token_server import PCM, FakeTokenService
from gateway import metrics
from otlp_receiver import Receiver, running_receiver
from test_gateway_http import http_gateway, speech
from ports import free_port_run

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "chorus-test-service"
OTLP_CLIENT, OTLP_SERVER = 3, 2
OTLP_STATUS_ERROR = 2
ECHO = "chorus.test.Gaps"


pytestmark = pytest.mark.usefixtures("no_tracing_left_over")


def _spans(receiver) -> list[tuple[dict[str, str], object]]:
    return [({a.key: a.value.string_value for a in rs.resource.attributes}, s)
            for request in list(receiver.requests) for rs in request.resource_spans
            for ss in rs.scope_spans for s in ss.spans]


def _attributes(span) -> dict[str, object]:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


def _count(api: str, method: str, code: str) -> float:
    return metrics.REGISTRY.get_sample_value(
        "chorus_gateway_requests_total", {"api": api, "method": method, "code": code}) or 0.0


# --- gaps 1 and 2: every door counted, and told apart ----------------------------------


def test_every_door_is_counted_under_its_own_api_label():
    """Riva's and tts.v1's Synthesize are separate series; the HTTP door's requests
    are in the same counter as `api="openai"`, so the error-rate alert sees them."""
    keys = [("tts.v1", "Synthesize", "OK"), ("riva", "Synthesize", "OK"),
            ("openai", "POST /v1/audio/speech", "OK"), ("openai", "POST /v1/audio/speech", "INVALID_ARGUMENT")]
    before = {key: _count(*key) for key in keys}

    async def scenario():
        async with http_gateway(FakeTokenService()) as (client, running):
            async with grpc.aio.insecure_channel(running.address) as channel:
                responses = gateway_pb2_grpc.SynthesisServiceStub(channel).Synthesize(
                    gateway_pb2.SynthesizeRequest(text="Over tts.v1.", audio=PCM), timeout=30)
                assert [r async for r in responses][-1].WhichOneof("payload") == "summary"
                riva = await riva_tts_pb2_grpc.RivaSpeechSynthesisStub(channel).Synthesize(
                    riva_tts_pb2.SynthesizeSpeechRequest(text="Over Riva.", encoding=riva_audio_pb2.LINEAR_PCM,
                                                         sample_rate_hz=24000), timeout=30)
                assert riva.audio
            assert (await client.post("/v1/audio/speech", json=speech(response_format="pcm"))).status_code == 200
            assert (await client.post("/v1/audio/speech", json=speech(voice="nobody"))).status_code == 400

    asyncio.run(scenario())
    assert {key: _count(*key) - before[key] for key in keys} == dict.fromkeys(keys, 1)
    # No series without the label, which an alert summing by api would miss.
    families = {m.name: m for m in metrics.REGISTRY.collect()}
    assert all("api" in s.labels for s in families["chorus_gateway_requests"].samples)
    assert metrics.REGISTRY.get_sample_value(
        "chorus_gateway_in_flight_requests", {"api": "openai", "method": "POST /v1/audio/speech"}) == 0


# --- gap 3: CLIENT spans of cancelled and expired calls ---------------------------------


class _Handlers:
    async def slow(self, request: bytes, context) -> bytes:
        await asyncio.sleep(30)
        return b""

    async def stream(self, request: bytes, context):
        while True:
            yield b"chunk"
            await asyncio.sleep(0.01)

    def generic(self):
        identity = dict(request_deserializer=None, response_serializer=None)
        unary = grpc.unary_unary_rpc_method_handler(self.slow, **identity)
        stream = grpc.unary_stream_rpc_method_handler(self.stream, **identity)
        return grpc.method_handlers_generic_handler(ECHO, {
            "UnaryExpires": unary, "UnaryCancelled": unary,
            "StreamExpires": stream, "StreamCancelled": stream, "StreamReaderCancelled": stream,
        })


def test_cancelled_and_expired_calls_are_errors_on_both_ends(receiver):
    tracing.setup_tracing(SERVICE, receiver.endpoint)

    async def scenario():
        server = new_server(None)
        server.add_generic_rpc_handlers((_Handlers().generic(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = new_channel(f"127.0.0.1:{port}")
        try:
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary(f"/{ECHO}/UnaryExpires")(b"", timeout=0.3)
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in channel.unary_stream(f"/{ECHO}/StreamExpires")(b"", timeout=0.3):
                    pass

            call = channel.unary_unary(f"/{ECHO}/UnaryCancelled")(b"", timeout=30)
            await asyncio.sleep(0.2)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

            stream = channel.unary_stream(f"/{ECHO}/StreamCancelled")(b"", timeout=30)
            await anext(aiter(stream))
            stream.cancel()

            # The gateway's way: the task reading the stream is cancelled (its own client
            # went away), and its `finally` cancels the call.
            started = asyncio.Event()

            async def reader():
                call = channel.unary_stream(f"/{ECHO}/StreamReaderCancelled")(b"", timeout=30)
                try:
                    async for _ in call:
                        started.set()
                finally:
                    call.cancel()

            task = asyncio.create_task(reader())
            await started.wait()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.3)  # the servers see the cancels
        finally:
            await channel.close()
            await server.stop(None)

    asyncio.run(scenario())
    assert tracing.flush_tracing(10_000)
    spans = {(s.name.rpartition("/")[2], s.kind): s for _, s in _spans(receiver)}
    want = {"UnaryExpires": grpc.StatusCode.DEADLINE_EXCEEDED, "StreamExpires": grpc.StatusCode.DEADLINE_EXCEEDED,
            "UnaryCancelled": grpc.StatusCode.CANCELLED, "StreamCancelled": grpc.StatusCode.CANCELLED,
            "StreamReaderCancelled": grpc.StatusCode.CANCELLED}
    for method, code in want.items():
        for kind in (OTLP_CLIENT, OTLP_SERVER):
            span = spans.get((method, kind))
            assert span is not None, (method, kind, sorted(spans))
            assert span.status.code == OTLP_STATUS_ERROR, (method, kind, span.status)
            assert span.status.message.startswith(f"{code.name}:"), (method, kind, span.status.message)
            assert _attributes(span)["rpc.grpc.status_code"] == code.value[0], (method, kind)


# --- gaps 4 and 5: HTTP spans -----------------------------------------------------------


def _http_spans(receiver, trace_id: str) -> dict[str, object]:
    return {s.name: s for _, s in _spans(receiver) if s.trace_id.hex() == trace_id}


def _wait_for(receiver, trace_id: str, names: set[str]) -> dict[str, object]:
    for _ in range(100):
        tracing.flush_tracing(10_000)
        spans = _http_spans(receiver, trace_id)
        if names <= set(spans):
            return spans
        time.sleep(0.1)
    raise AssertionError(f"{names} not exported; have {sorted(_http_spans(receiver, trace_id))}")


def test_http_spans_carry_http_attributes_and_the_request_id(receiver):
    tracing.setup_tracing(tracing.GATEWAY, receiver.endpoint)

    async def scenario():
        async with http_gateway(FakeTokenService()) as (client, _):
            ok = await client.post("/v1/audio/speech", json=speech(response_format="pcm"),
                                   headers={"User-Agent": "gap-test/5"})
            bad = await client.post("/v1/audio/speech", json=speech(voice="nobody"),
                                    headers={"User-Agent": "gap-test/5"})
            assert (await client.get("/health")).status_code == 200
            return ok, bad

    ok, bad = asyncio.run(scenario())
    assert ok.status_code == 200 and bad.status_code == 400
    spans = _wait_for(receiver, ok.headers["x-trace-id"], {"POST /v1/audio/speech", "gateway.openai.speech"})
    server, speech_span = spans["POST /v1/audio/speech"], spans["gateway.openai.speech"]
    assert server.kind == OTLP_SERVER and server.parent_span_id == b""
    assert speech_span.parent_span_id == server.span_id
    attrs = _attributes(server)
    assert attrs["http.request.method"] == "POST"
    assert attrs["url.path"] == "/v1/audio/speech"
    assert attrs["url.scheme"] == "http"
    assert attrs["http.response.status_code"] == 200
    assert attrs["user_agent.original"] == "gap-test/5"
    assert attrs["http.route"] == "/v1/audio/speech"
    # The gRPC doors' attribute name, and the id the response and the logs carry.
    assert attrs["chorus.request_id"] == ok.headers["x-request-id"] != ""
    assert _attributes(speech_span)["chorus.request_id"] == ok.headers["x-request-id"]
    assert attrs["chorus.status_code"] == "OK"
    assert server.status.code != OTLP_STATUS_ERROR

    # A refusal before any audio has its span too, with its status; a 4xx is the
    # client's, not an error of the server (HTTP semantic conventions).
    refused = [s for _, s in _spans(receiver) if s.name == "POST /v1/audio/speech"
               and _attributes(s).get("http.response.status_code") == 400]
    assert len(refused) == 1
    assert _attributes(refused[0])["chorus.status_code"] == "INVALID_ARGUMENT"
    assert refused[0].status.code != OTLP_STATUS_ERROR
    # Probes are not traced, as gRPC health checks are not.
    assert not [s for _, s in _spans(receiver) if s.name == "GET /health"]


def test_an_http_stream_that_fails_after_its_200_is_an_error(receiver):
    """The status said 200; the span must not."""
    tracing.setup_tracing(tracing.GATEWAY, receiver.endpoint)

    async def scenario():
        async with http_gateway(FakeTokenService(fail_after_frames=1)) as (client, _):
            return await client.post("/v1/audio/speech", json=speech(stream_format="sse", response_format="pcm"))

    sse = asyncio.run(scenario())
    assert sse.status_code == 200 and '"type":"error"' in sse.text
    spans = _wait_for(receiver, sse.headers["x-trace-id"], {"POST /v1/audio/speech", "gateway.openai.speech"})
    for name in ("POST /v1/audio/speech", "gateway.openai.speech"):
        assert spans[name].status.code == OTLP_STATUS_ERROR, name
        assert spans[name].status.message.startswith("UNAVAILABLE:"), (name, spans[name].status.message)
    assert _attributes(spans["POST /v1/audio/speech"])["chorus.status_code"] == "UNAVAILABLE"


def test_an_http_request_cut_off_by_its_client_is_an_error(receiver):
    tracing.setup_tracing(tracing.GATEWAY, receiver.endpoint)
    before = _count("openai", "POST /v1/audio/speech", "CANCELLED")

    async def scenario():
        fake = FakeTokenService(endless=True)
        async with http_gateway(fake) as (client, _):
            async with client.stream("POST", "/v1/audio/speech", json=speech(response_format="pcm")) as held:
                chunks = held.aiter_bytes()
                await anext(chunks)
                trace_id = held.headers["x-trace-id"]
            # The client has closed the connection mid-stream.
            for _ in range(200):
                if fake.cancelled:
                    break
                await asyncio.sleep(0.05)
            return trace_id

    trace_id = asyncio.run(scenario())
    spans = _wait_for(receiver, trace_id, {"POST /v1/audio/speech", "gateway.openai.speech"})
    for name in ("POST /v1/audio/speech", "gateway.openai.speech"):
        span = spans[name]
        assert span.status.code == OTLP_STATUS_ERROR, name
        assert span.status.message.startswith("CANCELLED:"), (name, span.status.message)
        assert "client disconnected" in [e.name for e in span.events], name
    assert _count("openai", "POST /v1/audio/speech", "CANCELLED") - before == 1


# --- gap 6: the standard OTEL_* variables ----------------------------------------------


class _HeaderReceiver(Receiver):
    """Also keeps the metadata each export came with."""

    def __init__(self):
        super().__init__()
        self.metadata: list[dict[str, str]] = []

    def Export(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return super().Export(request, context)


@contextlib.contextmanager
def _header_receiver():
    with running_receiver(_HeaderReceiver) as servicer:
        try:
            yield servicer
        finally:
            tracing.shutdown_tracing()


def test_standard_otel_variables_are_honoured(monkeypatch):
    with _header_receiver() as standard:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://{standard.endpoint}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # the traces one wins
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=chorus-test,authorization=Bearer%20t0ken")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "chorus-gateway-eu")
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging,k8s.pod.name=gw-0")
        tracing.setup_tracing(tracing.GATEWAY, None)
        with tracing.span("via OTEL variables"):
            pass
        assert tracing.flush_tracing(10_000)
        ((resource, _),) = [(r, s) for r, s in _spans(standard) if s.name == "via OTEL variables"]
        assert resource["service.name"] == "chorus-gateway-eu"
        assert (resource["deployment.environment"], resource["k8s.pod.name"]) == ("staging", "gw-0")
        assert standard.metadata[0]["x-tenant"] == "chorus-test"
        assert standard.metadata[0]["authorization"] == "Bearer t0ken"

        # Chorus's own endpoint (--otlp-endpoint / CHORUS_OTLP_ENDPOINT) wins; without
        # OTEL_SERVICE_NAME the service keeps its own name, with the other attributes.
        monkeypatch.delenv("OTEL_SERVICE_NAME")
        with running_receiver() as own:
            tracing.setup_tracing(tracing.GATEWAY, own.endpoint)
            with tracing.span("via Chorus's endpoint"):
                pass
            assert tracing.flush_tracing(10_000)
            tracing.shutdown_tracing()
            ((resource, _),) = [(r, s) for r, s in _spans(own) if s.name == "via Chorus's endpoint"]
        assert resource["service.name"] == tracing.GATEWAY
        assert resource["deployment.environment"] == "staging"
        assert "via Chorus's endpoint" not in {s.name for _, s in _spans(standard)}


# --- gaps 7 and 8: `chorus serve` metrics ports, process metrics everywhere ------------



def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


@pytest.mark.slow
def test_chorus_serve_spreads_metrics_ports_and_every_service_has_process_metrics(demo_models, receiver, tmp_path):
    """CHORUS_METRICS_PORT=BASE (as --metrics-port BASE): the gateway on BASE, the token
    server on BASE+1, the codec worker on BASE+2, where three services once fought for
    one port; each of them exports the process metrics; --otlp-endpoint reaches all
    three, each under its own name (OTEL_SERVICE_NAME is not handed down)."""
    base = free_port_run(5)  # the NeuTTS-Air pair, served by default beside demo models, takes BASE+3 and BASE+4
    env = {**os.environ, "CHORUS_METRICS_PORT": str(base), "PYTHONUNBUFFERED": "1",
           "OTEL_SERVICE_NAME": "one-name-for-all", "OTEL_BSP_SCHEDULE_DELAY": "200",
           "CHORUS_NO_CALIBRATE": "1"}  # measures no capacity: the services start without calibrating
    log = (tmp_path / "serve.log").open("w+")
    serve = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "serve", "--models", str(demo_models.root), "--gateway-port", "0",
         "--http-port", "0", "--slots", "1", "--otlp-endpoint", receiver.endpoint],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops" not in Path(log.name).read_text():
            assert serve.poll() is None, Path(log.name).read_text()[-3000:]
            assert time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
            time.sleep(0.2)
        printed = Path(log.name).read_text()
        tiers = {"chorus_gateway_": base, "chorus_token_server_": base + 1, "chorus_codec_worker_": base + 2}
        for prefix, port in tiers.items():
            assert f"127.0.0.1:{port}/metrics" in printed, printed
            body = _scrape(port)
            assert prefix in body, (port, "does not serve its tier's metrics")
            others = [p for p in tiers if p != prefix]
            assert not any(other in body for other in others), (port, "serves another tier's metrics")
            for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
                value = [line for line in body.splitlines() if line.startswith(name + " ")]
                assert value and float(value[0].split()[1]) > 0, (port, name)

        gateway_address = next(line.split()[1] for line in printed.splitlines() if line.startswith("gateway: "))
        with grpc.insecure_channel(gateway_address) as channel:
            request = gateway_pb2.SynthesizeRequest(text="Traced.", audio=PCM)
            request.sampling.max_tokens, request.sampling.seed = 7 * 4, 5
            list(gateway_pb2_grpc.SynthesisServiceStub(channel).Synthesize(request, timeout=120))
        services = set()
        for _ in range(150):
            services = {resource.get("service.name") for resource, _ in _spans(receiver)}
            if {tracing.GATEWAY, tracing.TOKEN_SERVER, tracing.CODEC_WORKER} <= services:
                break
            time.sleep(0.2)
        assert services == {tracing.GATEWAY, tracing.TOKEN_SERVER, tracing.CODEC_WORKER}
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
        log.close()
