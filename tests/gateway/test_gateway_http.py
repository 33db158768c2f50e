"""The gateway's HTTP port (OpenAI's speech endpoint, voices, health, the page) in this
process against fake token servers: request checks and the status each gRPC code
becomes. The end-to-end suite drives it with the `openai` package on the real stack."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import grpc
import httpx2 as httpx
import pytest

from certs import CertificateAuthority, TlsFolder
from chorus.proto.tts.v1 import gateway_pb2, gateway_pb2_grpc
from chorus.security.tls import TlsFiles
from chorus.speech.orpheus import SAMPLES_PER_FRAME
from chorus.telemetry.tiers import CODEC_WORKER, GATEWAY, TOKEN_SERVER
from gateway import metrics
from gateway.config import GatewayConfig
from gateway.server import start_server
from fake_token_server import PCM, FakeTokenService, token_server
from test_security import pki  # noqa: F401 (the fixture: a CA and a certificate per tier)


@contextlib.asynccontextmanager
async def http_gateway(fake: FakeTokenService, **overrides):
    async with token_server(fake) as address:
        running = await start_server(GatewayConfig(token_servers=(address,), http_port=0, **overrides), port=0)
        try:
            async with httpx.AsyncClient(base_url=f"http://{running.endpoints['http']}", timeout=60) as client:
                yield client, running
        finally:
            await running.stop(0)


JSON = {"Content-Type": "application/json"}


def speech(**fields):
    return {"model": "tts-1", "input": "Hello there.", **fields}


BAD_BODIES = [
    ({"input": "Hi."}, "`model` is required"),
    (speech(input=""), "text is empty"),
    (speech(voice="nobody"), "unknown voice 'nobody'"),
    (speech(response_format="m4a"), "response_format 'm4a'"),
    (speech(speed=10), "speed is 10"),
    (speech(speed="fast"), "speed is 'fast'"),
    (speech(stream_format="websocket"), "stream_format 'websocket'"),
    (speech(sampling={"temperature": "hot"}), "sampling.temperature is 'hot'"),
    (speech(sampling={"top_p": 0}), "sampling.top_p is 0"),
    (speech(voice=["alloy"]), "`voice` must be a voice name"),
    (speech(voice={"name": "alloy"}), "`voice` as an object must be"),
    (speech(stream="no"), "stream must be true"),
    (speech(response_format="opus", sample_rate=44100), "does not support 44100 Hz"),
]


@pytest.mark.parametrize("body,message", BAD_BODIES, ids=[m for _, m in BAD_BODIES])
def test_bad_bodies_get_400_in_openai_shape(body, message):
    async def scenario():
        fake = FakeTokenService()
        async with http_gateway(fake) as (client, _):
            reply = await client.post("/v1/audio/speech", json=body)
            assert reply.status_code == 400
            error = reply.json()["error"]
            assert message in error["message"] and error["type"] == "invalid_request_error"
            assert not fake.requests

    asyncio.run(scenario())


def test_not_json_and_oversized_bodies():
    """The body limit is the gRPC port's message limit (1 MiB here), whether the body
    declares its length or arrives chunked without one."""

    async def chunked():
        yield b'{"model": "tts-1", "input": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}'

    async def scenario():
        fake = FakeTokenService()
        async with http_gateway(fake, max_text_chars=100) as (client, _):
            reply = await client.post("/v1/audio/speech", content=b"{nope", headers=JSON)
            assert reply.status_code == 400 and "not JSON" in reply.json()["error"]["message"]
            declared = await client.post("/v1/audio/speech", json=speech(input="x" * (1024 * 1024)))
            streamed = await client.post("/v1/audio/speech", content=chunked(), headers=JSON)
            for reply in (declared, streamed):
                assert reply.status_code == 413
                assert "reads at most 1048576 bytes" in reply.json()["error"]["message"]
            assert not fake.requests

    asyncio.run(scenario())


def test_the_message_limit_grows_with_the_longest_text():
    """A body with the longest text the gateway takes is read (and judged on its text), not refused for size."""

    async def scenario():
        async with http_gateway(FakeTokenService(), max_text_chars=300_000) as (client, _):
            return await client.post("/v1/audio/speech", json=speech(input="x" * 1_100_000))

    reply = asyncio.run(scenario())
    assert GatewayConfig(token_servers=("ts:1",), max_text_chars=300_000).max_request_bytes == 4 * 300_000 + 65536
    assert reply.status_code == 400 and "300000" in reply.json()["error"]["message"]


@pytest.mark.parametrize("code,status", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429), (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504), (grpc.StatusCode.INVALID_ARGUMENT, 400),
])
def test_grpc_codes_become_http_statuses(code, status):
    async def scenario():
        async with http_gateway(FakeTokenService(fail_with=code)) as (client, _):
            reply = await client.post("/v1/audio/speech", json=speech())
            assert reply.status_code == status
            assert reply.json()["error"]["code"] == code.name.lower()

    asyncio.run(scenario())


def test_audio_streams_with_its_content_type_and_voice_aliases_resolve():
    async def scenario():
        fake = FakeTokenService()
        async with http_gateway(fake) as (client, _):
            reply = await client.post("/v1/audio/speech", json=speech(voice="onyx", response_format="pcm"))
            assert reply.status_code == 200 and reply.headers["content-type"] == "audio/pcm"
            assert fake.requests[0].voice == "leo"
            assert len(reply.content) // 2 == fake.frames_for(fake.requests[0].text) * SAMPLES_PER_FRAME
            assert reply.headers["x-request-id"]
            voices = (await client.get("/v1/audio/voices")).json()
            assert voices["voices"][0]["id"] == "tara" and voices["aliases"]["alloy"] == "tara"
            page = await client.get("/")
            assert page.status_code == 200 and "window.chorus" in page.text

    asyncio.run(scenario())


def test_health_follows_serving_and_draining_refuses_new_speech():
    async def scenario():
        async with http_gateway(FakeTokenService()) as (client, running):
            assert (await client.get("/health")).json() == {"status": "serving"}
            await running.set_serving(False)
            health = await client.get("/health")
            assert health.status_code == 503
            reply = await client.post("/v1/audio/speech", json=speech())
            assert reply.status_code == 503 and "shutting down" in reply.json()["error"]["message"]

    asyncio.run(scenario())


def test_drain_lets_an_open_stream_finish():
    async def scenario():
        fake = FakeTokenService(frame_delay_s=0.05)
        async with http_gateway(fake) as (client, running):
            async with client.stream("POST", "/v1/audio/speech", json=speech(response_format="pcm")) as reply:
                chunks = reply.aiter_bytes()
                first = await anext(chunks)
                held = running.access.in_flight
                stopping = asyncio.ensure_future(running.stop(30))
                rest = b"".join([chunk async for chunk in chunks])
            await stopping
            assert (held, running.access.in_flight) == (1, 0), "the HTTP stream held the drain open"
            assert (len(first) + len(rest)) // 2 == fake.frames_for(fake.requests[0].text) * SAMPLES_PER_FRAME

    asyncio.run(scenario())


# --- one access policy for both ports --------------------------------------------------

ALICE = "alice-0123456789abcdef0123456789"
BOB = "bob-fedcba9876543210fedcba987654"


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    return path


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_the_http_port_takes_the_grpc_ports_keys(keys_file):
    """No key or a wrong one: 401 in OpenAI's shape before any work; the page and
    /health stay open, and every other path (one that does not exist too) needs a key."""

    refused_before = {reason: _refused(reason) for reason in ("no_api_key", "bad_api_key")}

    async def scenario():
        fake = FakeTokenService()
        async with http_gateway(fake, api_keys_file=keys_file) as (client, _):
            missing = await client.post("/v1/audio/speech", json=speech())
            wrong = await client.post("/v1/audio/speech", json=speech(), headers=bearer(ALICE[:-1] + "X"))
            voices = await client.get("/v1/audio/voices")
            nowhere = await client.get("/v1/models")
            refused_before_work = not fake.requests
            served = await client.post("/v1/audio/speech", json=speech(response_format="pcm"), headers=bearer(ALICE))
            by_header = await client.get("/v1/audio/voices", headers={"X-API-Key": BOB})
            open_doors = [(await client.get(path)).status_code for path in ("/", "/health")]
            return missing, wrong, voices, nowhere, refused_before_work, served, by_header, open_doors

    missing, wrong, voices, nowhere, refused_before_work, served, by_header, open_doors = asyncio.run(scenario())
    for reply in (missing, wrong, voices, nowhere):
        assert reply.status_code == 401
        assert reply.headers["www-authenticate"] == "Bearer"
        error = reply.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "unauthenticated"
    assert "needs an API key: send `authorization: Bearer <key>`" in missing.json()["error"]["message"]
    assert "the API key is not valid" in wrong.json()["error"]["message"]
    assert refused_before_work
    assert served.status_code == 200 and len(served.content) > 0
    assert by_header.status_code == 200 and by_header.json()["voices"]
    assert open_doors == [200, 200]
    assert {reason: _refused(reason) - before for reason, before in refused_before.items()} == {
        "no_api_key": 3, "bad_api_key": 1}


def _refused(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("chorus_gateway_refused_calls_total", {"reason": reason}) or 0.0


def test_streams_per_key_are_counted_across_both_ports(keys_file):
    """One policy, two doors: a stream held over HTTP spends the key's share on gRPC,
    and one held over gRPC spends it on HTTP."""

    key_limit_before = _refused("key_limit")

    async def scenario():
        fake = FakeTokenService(endless=True)
        async with http_gateway(fake, api_keys_file=keys_file, max_streams_per_key=1) as (client, running):
            async with grpc.aio.insecure_channel(running.address) as channel:
                stub = gateway_pb2_grpc.SynthesisServiceStub(channel)
                request = gateway_pb2.SynthesizeRequest(text="Held over HTTP.", audio=PCM)
                async with client.stream("POST", "/v1/audio/speech", json=speech(response_format="pcm"),
                                         headers=bearer(ALICE)) as held:
                    chunks = held.aiter_bytes()  # kept: a dropped iterator closes the response
                    await anext(chunks)
                    over_grpc = stub.Synthesize(request, metadata=(("authorization", f"Bearer {ALICE}"),))
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await anext(aiter(over_grpc))
                    async with client.stream("POST", "/v1/audio/speech", json=speech(), headers=bearer(BOB)) as other:
                        other_key = other.status_code
                held_grpc = stub.Synthesize(request, metadata=(("authorization", f"Bearer {ALICE}"),))
                await anext(aiter(held_grpc))
                over_http = await client.post("/v1/audio/speech", json=speech(), headers=bearer(ALICE))
                held_grpc.cancel()
                return refused.value, over_http, other_key

    refused, over_http, other_key = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "API key alice already holds 1 streams" in refused.details()
    assert over_http.status_code == 429
    assert over_http.json()["error"]["type"] == "rate_limit_error"
    assert "API key alice already holds 1 streams" in over_http.json()["error"]["message"]
    assert other_key == 200, "the limit is alice's alone"
    assert _refused("key_limit") - key_limit_before == 2


def _count(method: str, code: str) -> float:
    # `api`: the door, "openai" for every call on the HTTP port (access.HttpGuard).
    labels = {"api": "openai", "method": method, "code": code}
    return metrics.REGISTRY.get_sample_value("chorus_gateway_requests_total", labels) or 0.0


def test_http_calls_are_counted_like_grpc_calls(keys_file):
    """requests_total by method and gRPC code, and in-flight back at zero once done."""
    speech_method = "POST /v1/audio/speech"
    before = {code: _count(speech_method, code) for code in ("OK", "UNAUTHENTICATED", "INVALID_ARGUMENT")}
    before_other = _count("other", "UNAUTHENTICATED")

    async def scenario():
        async with http_gateway(FakeTokenService(), api_keys_file=keys_file) as (client, _):
            assert (await client.post("/v1/audio/speech", json=speech(), headers=bearer(ALICE))).status_code == 200
            assert (await client.post("/v1/audio/speech", json=speech())).status_code == 401
            bad = await client.post("/v1/audio/speech", json=speech(voice="nobody"), headers=bearer(ALICE))
            assert bad.status_code == 400
            assert (await client.get("/no/such/path")).status_code == 401
            assert (await client.get("/health")).status_code == 200

    asyncio.run(scenario())
    assert {code: _count(speech_method, code) - before[code] for code in before} == {
        "OK": 1, "UNAUTHENTICATED": 1, "INVALID_ARGUMENT": 1}
    assert _count("other", "UNAUTHENTICATED") - before_other == 1
    assert metrics.REGISTRY.get_sample_value("chorus_gateway_in_flight_requests",
                                             {"api": "openai", "method": speech_method}) == 0
    assert metrics.REGISTRY.get_sample_value("chorus_gateway_in_flight_requests", {"method": "GET /health"}) is None


def test_a_stream_that_fails_after_its_audio_started_is_counted_with_its_code():
    """The status was 200 by then: the code the synthesis failed with is what counts."""
    speech_method = "POST /v1/audio/speech"
    before = _count(speech_method, "UNAVAILABLE")

    async def scenario():
        async with http_gateway(FakeTokenService(fail_after_frames=1)) as (client, _):
            sse = await client.post("/v1/audio/speech", json=speech(stream_format="sse", response_format="pcm"))
            with pytest.raises(httpx.TransportError):
                await client.post("/v1/audio/speech", json=speech(response_format="pcm"))
            return sse

    sse = asyncio.run(scenario())
    assert sse.status_code == 200 and '"type":"error"' in sse.text
    assert _count(speech_method, "UNAVAILABLE") - before == 2


APP_ORIGIN = "https://app.example.com"


def preflight(origin: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_is_off_unless_origins_are_allowed(keys_file):
    async def scenario():
        async with http_gateway(FakeTokenService(), api_keys_file=keys_file) as (off, _):
            off_preflight = await off.options("/v1/audio/speech", headers=preflight(APP_ORIGIN))
        async with http_gateway(FakeTokenService(), api_keys_file=keys_file, cors_origins=(APP_ORIGIN,)) as (on, _):
            allowed = await on.options("/v1/audio/speech", headers=preflight(APP_ORIGIN))
            other = await on.options("/v1/audio/speech", headers=preflight("https://evil.example"))
            keyless = await on.post("/v1/audio/speech", json=speech(), headers={"Origin": APP_ORIGIN})
            served = await on.post("/v1/audio/speech", json=speech(), headers={"Origin": APP_ORIGIN, **bearer(ALICE)})
        return off_preflight, allowed, other, keyless, served

    off_preflight, allowed, other, keyless, served = asyncio.run(scenario())
    assert "access-control-allow-origin" not in off_preflight.headers
    assert off_preflight.status_code == 401, "no CORS: a preflight is a call like any other"
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    # The page on the allowed origin can read why it was refused, and read the audio once it has a key.
    assert keyless.status_code == 401 and keyless.headers["access-control-allow-origin"] == APP_ORIGIN
    assert served.status_code == 200 and served.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-request-id" in served.headers["access-control-expose-headers"].lower()


@pytest.mark.parametrize("seconds", [0, -1, 3601])
def test_the_http_read_timeout_must_be_sensible(seconds):
    with pytest.raises(ValueError, match=r"http_read_timeout_s must be in \(0, 3600\]"):
        GatewayConfig(token_servers=("ts:1",), http_read_timeout_s=seconds)


def test_the_http_read_timeout_comes_from_its_flag():
    from gateway.__main__ import build_config, parse_args

    args = parse_args(["--token-servers", "ts:1", "--http-read-timeout", "2.5"])
    assert build_config(args).http_read_timeout_s == 2.5


@pytest.mark.parametrize("origin", ["*", "https://app.example.com/", "app.example.com", "ftp://x.example"])
def test_cors_origins_must_be_origins(origin):
    with pytest.raises(ValueError, match="CORS origin .* must be scheme://host\\[:port\\]"):
        GatewayConfig(token_servers=("ts:1",), cors_origins=(origin,))


# --- TLS: the gRPC port's certificate, never plaintext ---------------------------------


def tls_client(folder: TlsFolder, client: TlsFolder | None = None) -> ssl.SSLContext:
    """Verifies the server against the CA; presents `client`'s certificate when given."""
    context = ssl.create_default_context(cafile=str(folder.ca))
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    return context


@contextlib.asynccontextmanager
async def https_gateway(pki, **overrides):
    """A gateway with TLS and no reachable token server: voices, health and the page answer from config."""
    tls = TlsFiles(pki[GATEWAY].cert, pki[GATEWAY].key, pki[GATEWAY].ca)
    running = await start_server(GatewayConfig(token_servers=("127.0.0.1:1",), http_port=0, tls=tls, **overrides))
    try:
        yield running.endpoints["http"]
    finally:
        await running.stop(0)


async def _answer(url: str, verify, **kwargs):
    """The status of GET `url`, or the transport error's class when nothing answered."""
    async with httpx.AsyncClient(verify=verify, timeout=10) as client:
        try:
            return (await client.get(url, **kwargs)).status_code
        except httpx.TransportError as err:
            return type(err).__name__


def test_with_tls_the_http_port_serves_https_only(pki, keys_file):
    async def scenario():
        async with https_gateway(pki, api_keys_file=keys_file) as http:
            return {
                "plaintext": await _answer(f"http://{http}/health", False),
                "health": await _answer(f"https://{http}/health", tls_client(pki[GATEWAY])),
                "page": await _answer(f"https://{http}/", tls_client(pki[GATEWAY])),
                "voices": await _answer(f"https://{http}/v1/audio/voices", tls_client(pki[GATEWAY]),
                                        headers=bearer(ALICE)),
                "keyless": await _answer(f"https://{http}/v1/audio/voices", tls_client(pki[GATEWAY])),
            }

    answers = asyncio.run(scenario())
    assert answers.pop("plaintext") in ("RemoteProtocolError", "ReadError", "ConnectError")
    assert answers == {"health": 503, "page": 200, "voices": 200, "keyless": 401}, (
        "health is 503: no token server is reachable, and it says so over HTTPS"
    )


def test_a_gateway_that_requires_client_certificates_checks_them_on_http_too(pki):
    async def scenario():
        async with https_gateway(pki, allowed_clients=(TOKEN_SERVER,)) as http:
            voices, health = f"https://{http}/v1/audio/voices", f"https://{http}/health"
            async with httpx.AsyncClient(verify=tls_client(pki[GATEWAY], pki[CODEC_WORKER]), timeout=10) as other:
                denied = await other.get(voices)
            return {
                "allowed": await _answer(voices, tls_client(pki[GATEWAY], pki[TOKEN_SERVER])),
                "other": denied,
                "other health": await _answer(health, tls_client(pki[GATEWAY], pki[CODEC_WORKER])),
                "none": await _answer(voices, tls_client(pki[GATEWAY])),
            }

    answers = asyncio.run(scenario())
    denied = answers.pop("other")
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    assert "takes calls only from chorus-token-server" in denied.json()["error"]["message"]
    assert "names chorus-codec-worker" in denied.json()["error"]["message"]
    assert answers.pop("none") in ("RemoteProtocolError", "ReadError", "ConnectError")
    assert answers == {"allowed": 200, "other health": 503}


def test_certificates_are_read_at_start(pki, tmp_path):
    """A certificate renewed on disk takes effect at the next restart: both ports keep
    presenting the one they started with."""
    folder = TlsFolder(tmp_path / "gateway")
    folder.path.mkdir()
    for name in ("cert", "key", "ca"):
        getattr(folder, name).write_bytes(getattr(pki[GATEWAY], name).read_bytes())
    renewed = CertificateAuthority("renewed-ca").issue(tmp_path / "renewed", GATEWAY)

    async def scenario():
        tls = TlsFiles(folder.cert, folder.key, folder.ca)
        running = await start_server(GatewayConfig(token_servers=("127.0.0.1:1",), http_port=0, tls=tls))
        try:
            for name in ("cert", "key", "ca"):
                getattr(folder, name).write_bytes(getattr(renewed, name).read_bytes())
            https = await _answer(f"https://{running.endpoints['http']}/health", tls_client(pki[GATEWAY]))
            credentials = grpc.ssl_channel_credentials(pki[GATEWAY].ca.read_bytes())
            async with grpc.aio.secure_channel(running.address, credentials) as channel:
                limits = await gateway_pb2_grpc.SynthesisServiceStub(channel).GetLimits(
                    gateway_pb2.GetLimitsRequest(), timeout=10)
            return https, limits.max_text_chars
        finally:
            await running.stop(0)

    assert asyncio.run(scenario()) == (503, 20_000), "the old certificate still verifies on both ports"
