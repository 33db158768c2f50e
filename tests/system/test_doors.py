"""Every door of a secured gateway against every access rule, the expected answers
read from docs/security.md's table, so that the doc and the code cannot drift apart.

One stack of the three services as processes, with TLS, mutual TLS, API keys laid
out as a mounted Secret, the HTTP port and the metrics port, serves every cell. Each
cell makes one call and reduces what came back to one word of the table's: `served`
(the door's own answer), a gRPC status name, an HTTP status, or `no connection`.

Also here: what issue 17 was closed on, done as a user would do it: `curl` and the
`openai` package over HTTPS with and without a key, and the browser page over HTTPS.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import grpc
import httpx2 as httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from certs import TlsFolder
from chorus.proto.riva import riva_audio_pb2, riva_tts_pb2, riva_tts_pb2_grpc
from chorus.proto.tts.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from chorus.speech.orpheus import SAMPLES_PER_FRAME
from chorus.telemetry.tiers import GATEWAY
from fake_token_server import free_port_address
from test_client_apis import CHROMIUM_FLAGS, chromium  # noqa: F401 (the fixture)
from test_security import SecretVolume, keys_text, otlp, pki, secured_stack, span_attributes  # noqa: F401 (fixtures)
from tools.supervisor import Stack

pytestmark = pytest.mark.slow

SECURITY_DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
OLD = "door-old-000000000000000000000000"
NEW = "door-new-111111111111111111111111"
NEVER_ISSUED = "door-bad-222222222222222222222222"
FRAMES = 4
SAMPLING = {"max_tokens": 7 * FRAMES, "ignore_end_of_speech": True, "seed": 7}


def door_table(text: str) -> dict[tuple[str, str], str]:
    """The expected answer of each (door, rule) in the doc's table whose first header
    cell is "door"; a cell's note in parentheses is not part of the answer."""
    lines = iter(text.splitlines())
    for line in lines:
        if re.match(r"\|\s*door\s*\|", line):
            rules = [cell.strip() for cell in line.strip().strip("|").split("|")][1:]
            break
    else:
        raise AssertionError("docs/security.md has no table whose first column is `door`")
    next(lines)  # |---|---|
    cells = {}
    for line in lines:
        if not line.startswith("|"):
            break
        door, *answers = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(answers) == len(rules), f"row {door!r} has {len(answers)} cells for {len(rules)} rules"
        for rule, answer in zip(rules, answers):
            cells[(door, rule)] = answer.split(" (")[0].strip("` ")
    return cells


TABLE = door_table(SECURITY_DOC.read_text())


# --- the stack ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_keys(tmp_path_factory) -> SecretVolume:
    volume = SecretVolume(tmp_path_factory.mktemp("api-keys"))
    volume.write(keys_text(("door", OLD)))
    return volume


class Doors:
    """The secured stack and how to reach each of its doors as each rule's client."""

    def __init__(self, stack: Stack, pki: dict[str, TlsFolder], api_keys: SecretVolume, metrics_port: int) -> None:
        self.stack, self.pki, self.api_keys = stack, pki, api_keys
        self.grpc_address = stack.gateway_address
        self.http_address = stack.gateway_http_address
        self.metrics_address = f"127.0.0.1:{metrics_port}"

    def channel(self, tls: bool = True, client: TlsFolder | None = None) -> grpc.Channel:
        if not tls:
            return grpc.insecure_channel(self.grpc_address)
        ca = self.pki[GATEWAY].ca.read_bytes()
        if client is None:
            return grpc.secure_channel(self.grpc_address, grpc.ssl_channel_credentials(ca))
        credentials = grpc.ssl_channel_credentials(ca, client.key.read_bytes(), client.cert.read_bytes())
        return grpc.secure_channel(self.grpc_address, credentials)

    def http(self, tls: bool = True, client: TlsFolder | None = None) -> httpx.Client:
        if not tls:
            return httpx.Client(base_url=f"http://{self.http_address}", timeout=120)
        context = ssl.create_default_context(cafile=str(self.pki[GATEWAY].ca))
        if client is not None:
            context.load_cert_chain(client.cert, client.key)
        return httpx.Client(base_url=f"https://{self.http_address}", verify=context, timeout=120)


@pytest.fixture(scope="module")
def doors(demo_models, tmp_path_factory, pki, api_keys, otlp) -> Doors:
    metrics_port = int(free_port_address().rpartition(":")[2])
    gateway_flags = ["--api-keys-file", str(api_keys.path), "--metrics-port", str(metrics_port)]
    with secured_stack(demo_models.root, tmp_path_factory.mktemp("doors-stack"), pki, otlp, gateway_flags) as stack:
        doors = Doors(stack, pki, api_keys, metrics_port)
        # The key works, then a rotation replaces it while the gateway runs.
        assert observe(doors, "tts.v1", "current key", secret=OLD) == "served"
        api_keys.write(keys_text(("door", NEW)))
        yield doors


# --- one call per door, reduced to the table's words --------------------------------


def _grpc_answer(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNAVAILABLE and "draining" not in err.details():
            return "no connection"  # the handshake failed: nothing reached a handler
        return err.code().name
    return "served"


def _http_answer(call: Callable[[], httpx.Response], served: Callable[[httpx.Response], bool]) -> str:
    try:
        reply = call()
    except httpx.TransportError:
        return "no connection"
    if reply.status_code == 200:
        assert served(reply), f"200 without the door's answer: {reply.text[:300]}"
        return "served"
    if reply.status_code == 401:
        assert reply.json()["error"]["type"] == "authentication_error", reply.text
    return str(reply.status_code)


def _metadata(secret: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),) if secret else ()


def _headers(secret: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"} if secret else {}


def tts_v1(doors: Doors, secret, tls, client) -> str:
    request = gateway_pb2.SynthesizeRequest(text="Through the front door.",
                                            sampling=common_pb2.SamplingParams(**SAMPLING))

    def call():
        with doors.channel(tls, client) as channel:
            replies = list(gateway_pb2_grpc.SynthesisServiceStub(channel).Synthesize(
                request, metadata=_metadata(secret), timeout=120))
        assert sum(r.audio.num_samples for r in replies) == FRAMES * SAMPLES_PER_FRAME

    return _grpc_answer(call)


def riva(doors: Doors, secret, tls, client) -> str:
    request = riva_tts_pb2.SynthesizeSpeechRequest(
        text="Through the Riva door.", language_code="en-US", encoding=riva_audio_pb2.LINEAR_PCM,
        sample_rate_hz=24000, custom_configuration={k: str(v).lower() for k, v in SAMPLING.items()},
    )

    def call():
        with doors.channel(tls, client) as channel:
            reply = riva_tts_pb2_grpc.RivaSpeechSynthesisStub(channel).Synthesize(
                request, metadata=_metadata(secret), timeout=120)
        assert len(reply.audio) // 2 == FRAMES * SAMPLES_PER_FRAME

    return _grpc_answer(call)


def openai_http(doors: Doors, secret, tls, client) -> str:
    body = {"model": "tts-1", "input": "Through the OpenAI door.", "response_format": "pcm", "sampling": SAMPLING}

    def call():
        with doors.http(tls, client) as http:
            return http.post("/v1/audio/speech", json=body, headers=_headers(secret))

    return _http_answer(call, lambda reply: len(reply.content) // 2 == FRAMES * SAMPLES_PER_FRAME)


def page(doors: Doors, secret, tls, client) -> str:
    def call():
        with doors.http(tls, client) as http:
            return http.get("/", headers=_headers(secret))

    return _http_answer(call, lambda reply: "window.chorus" in reply.text)


def health(doors: Doors, secret, tls, client) -> str:
    def check():
        with doors.channel(tls, client) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), metadata=_metadata(secret), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def http_health():
        with doors.http(tls, client) as http:
            return http.get("/health", headers=_headers(secret))

    answers = {_grpc_answer(check), _http_answer(http_health, lambda reply: reply.json() == {"status": "serving"})}
    assert len(answers) == 1, f"gRPC and HTTP health disagree: {answers}"
    return answers.pop()


def reflection(doors: Doors, secret, tls, client) -> str:
    def call():
        with doors.channel(tls, client) as channel:
            reply = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=_metadata(secret), timeout=10))
        assert "tts.v1.SynthesisService" in {s.name for s in reply.list_services_response.service}

    return _grpc_answer(call)


def metrics(doors: Doors, secret, tls, client) -> str:
    """The metrics port is plaintext whatever the rule: the rule's client as far as it applies."""

    def call():
        return httpx.get(f"http://{doors.metrics_address}/metrics", headers=_headers(secret), timeout=10)

    return _http_answer(call, lambda reply: "chorus_gateway_requests_total" in reply.text)


DOORS = {"tts.v1": tts_v1, "Riva": riva, "OpenAI HTTP": openai_http, "browser page": page, "health": health,
         "reflection": reflection, "metrics": metrics}


def as_is(volume: SecretVolume):
    return contextlib.nullcontext()


@contextlib.contextmanager
def keys_file_gone(volume: SecretVolume):
    """The keys file disappears (a deleted Secret) for the duration, then comes back."""
    data = volume.root / "..data"
    target = os.readlink(data)
    data.unlink()
    try:
        yield
    finally:
        data.symlink_to(target)


RULES = {  # rule -> (secret, TLS, client certificate, what happens to the keys file meanwhile)
    "current key": (NEW, True, None, as_is),
    "no key": (None, True, None, as_is),
    "wrong key": (NEVER_ISSUED, True, None, as_is),
    "rotated key": (OLD, True, None, as_is),
    "expired key file": (NEW, True, None, keys_file_gone),
    "no TLS against TLS": (NEW, False, None, as_is),
    "wrong client certificate": (NEW, True, "rogue", as_is),
}


def observe(doors: Doors, door: str, rule: str, secret: str | None = None) -> str:
    """What `door` answers the client of `rule` (with `secret` instead of the rule's key)."""
    default_secret, tls, client, keys_file = RULES[rule]
    with keys_file(doors.api_keys):
        return DOORS[door](doors, secret or default_secret, tls, doors.pki[client] if client else None)


# --- the table -------------------------------------------------------------------------


def test_the_table_has_every_door_and_every_rule():
    assert {door for door, _ in TABLE} == set(DOORS)
    assert {rule for _, rule in TABLE} == set(RULES)
    assert set(TABLE.values()) <= {"served", "no connection", "UNAUTHENTICATED", "PERMISSION_DENIED", "401", "403"}


@pytest.mark.parametrize("door,rule", list(TABLE), ids=[f"{door}-{rule}" for door, rule in TABLE])
def test_every_door_answers_every_rule_as_the_doc_says(doors, door, rule):
    assert observe(doors, door, rule) == TABLE[(door, rule)]


def test_a_gone_keys_file_keeps_the_keys_read_before_and_says_so(doors):
    with keys_file_gone(doors.api_keys), doors.channel() as channel:
        voices = gateway_pb2_grpc.SynthesisServiceStub(channel).ListVoices(
            gateway_pb2.ListVoicesRequest(), metadata=_metadata(NEW), timeout=10)
    assert voices.voices
    assert "cannot be read" in doors.stack.gateway_process.log_tail(400)


def test_http_calls_are_logged_and_traced_by_key_id_never_by_secret(doors, otlp):
    body = {"model": "tts-1", "input": "Who is calling?", "response_format": "pcm", "sampling": SAMPLING}
    with doors.http() as http:
        reply = http.post("/v1/audio/speech", json=body, headers=_headers(NEW))
    assert reply.status_code == 200
    attributes = span_attributes(otlp, "gateway.openai.speech", reply.headers["x-trace-id"])
    assert (attributes.get("chorus.api_key_id"), attributes.get("chorus.client")) == ("door", "127.0.0.1")
    log = doors.stack.gateway_process.log_path.read_text()
    assert "POST /v1/audio/speech from 127.0.0.1 with key door" in log
    assert NEW not in log and OLD not in log


# --- issue 17's closing checks, as a user runs them ------------------------------------


def _curl(doors: Doors, out: Path, *args: str) -> tuple[int, str]:
    body = json.dumps({"model": "tts-1", "input": "Hello over HTTPS.", "response_format": "pcm",
                       "sampling": SAMPLING})
    done = subprocess.run(
        ["curl", "-sS", "-o", str(out), "-w", "%{http_code}", "-H", "Content-Type: application/json", "-d", body,
         *args], capture_output=True, text=True, timeout=120,
    )
    return done.returncode, done.stdout


def test_curl_needs_a_key_and_gets_audio_over_https(doors, tmp_path):
    url = f"https://{doors.http_address}/v1/audio/speech"
    ca = ["--cacert", str(doors.pki[GATEWAY].ca)]
    refused = _curl(doors, tmp_path / "refused.json", *ca, url)
    wrong = _curl(doors, tmp_path / "wrong.json", *ca, "-H", f"Authorization: Bearer {NEVER_ISSUED}", url)
    served = _curl(doors, tmp_path / "hello.pcm", *ca, "-H", f"Authorization: Bearer {NEW}", url)
    plaintext = _curl(doors, tmp_path / "plain", f"http://{doors.http_address}/health")
    assert refused == (0, "401") and wrong == (0, "401")
    assert json.loads((tmp_path / "refused.json").read_text())["error"]["code"] == "unauthenticated"
    assert served == (0, "200")
    assert (tmp_path / "hello.pcm").stat().st_size // 2 == FRAMES * SAMPLES_PER_FRAME
    assert plaintext[0] != 0 and plaintext[1] == "000", "no plaintext answer from the HTTPS port"


def test_the_openai_client_needs_a_key_and_gets_audio_over_https(doors):
    context = ssl.create_default_context(cafile=str(doors.pki[GATEWAY].ca))

    def client(api_key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"https://{doors.http_address}/v1", api_key=api_key, max_retries=0,
                             timeout=120, http_client=openai.DefaultHttpxClient(verify=context))

    with client("not-a-real-key") as refused, pytest.raises(openai.AuthenticationError) as err:
        refused.audio.speech.create(model="tts-1", voice="alloy", input="No key, no audio.")
    with client(NEW) as keyed:
        audio = keyed.audio.speech.create(model="tts-1", voice="alloy", input="Hello over HTTPS.",
                                          response_format="pcm", extra_body={"sampling": SAMPLING})
    assert err.value.status_code == 401
    assert "the API key is not valid" in err.value.body["message"]
    assert len(audio.content) // 2 == FRAMES * SAMPLES_PER_FRAME


def test_the_browser_page_plays_over_https_with_a_key(doors, chromium, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    sampling = json.dumps({**SAMPLING, "max_tokens": 7 * 12})
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            ignore_https_errors=True,  # the test CA is not the browser's
        )
        try:
            page = browser.new_page()
            page.goto(f"https://{doors.http_address}/?sampling={quote(sampling)}")
            page.wait_for_function("window.chorus.error !== null")
            keyless = page.evaluate("window.chorus.error")
            page.fill("#key", NEW)
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.querySelectorAll('#voice option').length > 0")
            page.fill("#text", "One sentence over HTTPS.")
            page.click("#speak")
            page.wait_for_function("window.chorus.done", timeout=180_000)
            stats = page.evaluate("window.chorus")
            kept = page.evaluate("sessionStorage.getItem('chorus-api-key')")
        finally:
            browser.close()
    assert "needs an API key" in keyless
    assert kept == NEW, "the key stays in the tab's session storage"
    assert stats["error"] is None
    assert stats["receivedSamples"] == 12 * SAMPLES_PER_FRAME
    assert stats["playedSamples"] == stats["receivedSamples"]
