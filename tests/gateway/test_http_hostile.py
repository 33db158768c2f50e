"""Hostile clients on the gateway's HTTP port, against real servers on 127.0.0.1:0
(the gateway in this process or as a process, fake token servers behind it):

- a bounded hypothesis run over the JSON body: every body gets a status below 500 (an
  OpenAI-shaped error for a 4xx) and the next good request is served; fields the door
  does not know (other servers' `language`, `lang_code`, ...) are ignored, so a body
  is refused only for the values of the fields it knows;
- clients that send slowly or not at all are cut off (headers and body deadlines);
- a client that half-closes after its request still gets its response;
- SIGTERM: the port stays open while streams drain (health 503 "draining", new
  speech 503), and an SSE stream still open when the drain's time is up ends with an
  `error` event.

The fixed rows (each defect found by hand or by this fuzzer) are the HTTP section of
tests/system/test_bad_input.py, run against a whole stack.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
from pathlib import Path

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fake_token_server import FakeTokenService, token_server, wait_until
from test_gateway_http import JSON, http_gateway, speech

pytestmark = pytest.mark.slow  # over 15 s: started first (tests/conftest.py)

REPO = Path(__file__).resolve().parents[2]


# --- fuzzing the body ---------------------------------------------------------------------


class ThreadedGateway:
    """A fake token server and a gateway with its HTTP port, on an event loop in a
    thread, so that hypothesis's synchronous test can call it."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._stop: asyncio.Event | None = None
        self._serving: asyncio.Future | None = None

    def __enter__(self) -> str:
        self._thread.start()
        ready = asyncio.run_coroutine_threadsafe(self._started(), self._loop).result(60)
        return ready

    async def _started(self) -> str:
        self._stop = asyncio.Event()
        started: asyncio.Future = self._loop.create_future()
        self._serving = asyncio.ensure_future(self._serve(started))
        return await started

    async def _serve(self, started: asyncio.Future) -> None:
        async with http_gateway(FakeTokenService()) as (_, running):
            started.set_result(running.endpoints["http"])
            await self._stop.wait()

    def __exit__(self, *exc) -> None:
        async def stop():
            self._stop.set()
            await self._serving

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def fuzzed_gateway():
    with ThreadedGateway() as address, httpx.Client(base_url=f"http://{address}", timeout=60) as client:
        yield client


FIELDS = ["model", "input", "voice", "response_format", "speed", "stream_format", "instructions", "sample_rate",
          "sampling", "request_id", "stream"]
# Fields of other servers' speech endpoints, which this door ignores (with a warning)
# rather than refuses: any value there must neither fail the request nor crash it.
FOREIGN_FIELDS = ["language", "lang_code", "voices", "speaker", "task_type"]
SAMPLING_KEYS = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed",
                 "ignore_end_of_speech"]

# Any text, unpaired surrogates included (JSON can spell them with escapes).
texts = st.text(st.one_of(st.characters(exclude_categories=()), st.characters(categories=["Cs"])), max_size=40)
scalars = st.one_of(
    st.none(), st.booleans(), texts,
    st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["tts-1", "Hello there.", "tara", "alloy", "pcm", "mp3", "opus", "wav", "sse", "audio",
                     "mulaw", "0.5", "1e309", "", " "]),
    # Edges of the types the values end up in (int32 and int64 proto fields, float32).
    st.sampled_from([0, 1, 7, 21, 8000, 22050, 24000, 48000, 2**31 - 1, 2**31, -(2**31) - 1, 2**63, 2**64, -1,
                     0.25, 4.0, 1e-40, 3.5e38]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    # "id": `voice` takes OpenAI's object {"id": name} too.
    st.dictionaries(st.one_of(st.sampled_from([*SAMPLING_KEYS, "id"]), texts), inner, max_size=3),
), max_leaves=8)
# Mostly bodies that pass the first checks (`model` and `input` present, short
# generations), each other field present or not with any value, so that every
# check down the line is reached; then anything at all.
bodies = st.one_of(
    st.fixed_dictionaries(
        {"model": st.one_of(st.just("tts-1"), values), "input": st.one_of(st.just("Hello there."), values)},
        optional={**{name: values for name in FIELDS + FOREIGN_FIELDS if name not in ("model", "input", "sampling")},
                  "sampling": st.one_of(values, st.fixed_dictionaries(
                      {"max_tokens": st.one_of(st.just(7), values)},
                      optional={key: values for key in SAMPLING_KEYS if key != "max_tokens"}))},
    ),
    st.dictionaries(st.one_of(st.sampled_from(FIELDS + FOREIGN_FIELDS), texts), values, max_size=8),
    values,
)


def _encode(body: object) -> bytes:
    # allow_nan: NaN and Infinity are what Python's json (the gateway's parser) reads too.
    return json.dumps(body, allow_nan=True).encode()


# The defects this run found, kept as its first examples (and as rows of test_bad_input.py).
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(body=bodies)
@example(body={"model": "tts-1", "input": "Hello \ud800 there."})
@example(body={"model": "tts-1", "input": "Hi.", "sample_rate": 2**31})
def test_fuzzed_bodies_never_get_a_5xx_and_the_next_request_is_served(fuzzed_gateway, body):
    reply = fuzzed_gateway.post("/v1/audio/speech", content=_encode(body), headers=JSON)
    assert reply.status_code < 500, f"{reply.status_code}: {reply.text[:500]}"
    if reply.status_code >= 400:
        error = reply.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error", error
    good = fuzzed_gateway.post("/v1/audio/speech", json=speech(response_format="pcm"))
    assert good.status_code == 200 and good.content


# Valid Unicode throughout: a body holding an unpaired surrogate anywhere is refused
# as a whole (the first @example above), before any field is looked at.
unicode_texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
unknown_fields = st.dictionaries(
    st.one_of(st.sampled_from(FOREIGN_FIELDS), unicode_texts).filter(lambda name: name not in FIELDS),
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), unicode_texts),
                 lambda inner: st.one_of(st.lists(inner, max_size=3),
                                         st.dictionaries(unicode_texts, inner, max_size=3)), max_leaves=6),
    min_size=1, max_size=4,
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(extra=unknown_fields)
def test_fields_the_door_does_not_know_never_fail_a_good_request(fuzzed_gateway, extra):
    reply = fuzzed_gateway.post("/v1/audio/speech", content=_encode({**extra, **speech(response_format="pcm")}),
                                headers=JSON)
    assert reply.status_code == 200 and reply.content, f"{reply.status_code}: {reply.text[:500]}"


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(raw=st.binary(max_size=200))
def test_fuzzed_bytes_never_get_a_5xx(fuzzed_gateway, raw):
    reply = fuzzed_gateway.post("/v1/audio/speech", content=raw, headers=JSON)
    assert reply.status_code < 500, f"{reply.status_code}: {reply.text[:500]}"


# --- slow, silent and half-closing clients ------------------------------------------------

READ_TIMEOUT_S = 1.0
GIVE_UP_S = 30  # a bound on each wait below, far past READ_TIMEOUT_S; not a measurement


async def _read_to_end(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), GIVE_UP_S)


def _request(raw_body: bytes, declared: int | None = None) -> bytes:
    length = len(raw_body) if declared is None else declared
    return (b"POST /v1/audio/speech HTTP/1.1\r\nHost: chorus\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(length).encode() + b"\r\n\r\n" + raw_body)


@pytest.mark.serial  # judges real time: runs alone (pyproject.toml's markers)
def test_silent_slow_and_half_sent_clients_are_cut_off():
    """A connection that sends nothing, one that sends its headers a byte at a time
    (slowloris), and one whose body never arrives whole are all closed; the last gets
    408 first. Each ran for good before (40-60 s and counting in the issue)."""

    async def scenario():
        async with http_gateway(FakeTokenService(), http_read_timeout_s=READ_TIMEOUT_S) as (client, running):
            host, port = running.endpoints["http"].rsplit(":", 1)

            reader, writer = await asyncio.open_connection(host, int(port))
            assert await _read_to_end(reader) == b"", "a silent connection is closed without an answer"
            writer.close()

            reader, writer = await asyncio.open_connection(host, int(port))
            head = _request(b"")
            closed = False
            for byte in range(len(head) - 2):  # never the final CRLF
                writer.write(head[byte:byte + 1])
                try:
                    await writer.drain()
                    closed = await asyncio.wait_for(reader.read(), 0.25) == b""
                except (TimeoutError, ConnectionError):
                    pass
                if closed:
                    break
            assert closed, "a client sending its headers a byte at a time is cut off"
            writer.close()

            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(_request(b'{"model": "tts-1", ', declared=200))
            answer = await _read_to_end(reader)
            writer.close()
            status, _, rest = answer.partition(b"\r\n")
            assert status == b"HTTP/1.1 408 Request Timeout", answer[:200]
            error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
            assert "did not arrive within 1 s" in error["message"] and error["code"] == "deadline_exceeded"

            assert (await client.post("/v1/audio/speech", json=speech())).status_code == 200

    asyncio.run(scenario())


def test_a_client_that_half_closes_after_its_request_gets_the_response():
    async def scenario():
        fake = FakeTokenService()
        async with http_gateway(fake) as (_, running):
            host, port = running.endpoints["http"].rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(_request(json.dumps(speech(response_format="pcm")).encode()))
            writer.write_eof()
            answer = await _read_to_end(reader)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
            assert b"content-type: audio/pcm" in answer.lower()

    asyncio.run(scenario())


# --- SIGTERM on a gateway process -----------------------------------------------------------

DRAIN_S = 3


async def _events(lines) -> list[dict]:
    events = []
    async for line in lines:
        if line.startswith("data: "):
            events.append(json.loads(line[len("data: "):]))
    return events


@pytest.mark.serial  # judges real time: runs alone (pyproject.toml's markers)
def test_sigterm_keeps_the_http_port_open_while_streams_drain(tmp_path):
    """During the drain /health answers 503 "draining" and new speech 503 (both
    connection refused before), a short stream finishes, and an SSE stream still
    open at the drain's end gets an `error` event before its end."""

    async def scenario():
        # Slow frames: the long text's stream outlives the drain many times over.
        fake = FakeTokenService(frame_delay_s=0.2)
        async with token_server(fake) as address:
            ready = tmp_path / "ready.json"
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "--token-servers", address, "--port", "0", "--http-port", "0",
                "--ready-file", str(ready), "--drain-seconds", str(DRAIN_S),
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            try:
                await wait_until(ready.exists, "the gateway's ready file", limit_s=GIVE_UP_S)
                http = json.loads(ready.read_text())["http"]
                async with httpx.AsyncClient(base_url=f"http://{http}", timeout=GIVE_UP_S) as client:
                    long = speech(input="Hello there, this goes on. " * 200, stream_format="sse")
                    async with client.stream("POST", "/v1/audio/speech", json=long) as cut, \
                            client.stream("POST", "/v1/audio/speech", json=speech(stream_format="sse")) as short:
                        cut_lines = cut.aiter_lines()
                        first = json.loads((await anext(cut_lines)).removeprefix("data: "))
                        assert first["type"] == "speech.audio.delta"
                        process.send_signal(signal.SIGTERM)

                        for _ in range(GIVE_UP_S * 20):
                            health = await client.get("/health")
                            if health.status_code == 503:
                                break
                            await asyncio.sleep(0.05)
                        assert (health.status_code, health.json()) == (503, {"status": "draining"})
                        refused = await client.post("/v1/audio/speech", json=speech())
                        assert refused.status_code == 503
                        assert refused.json()["error"]["code"] == "unavailable"
                        assert "draining" in refused.json()["error"]["message"]

                        short_events = await _events(short.aiter_lines())
                        cut_events = await _events(cut_lines)
                    assert short_events[-1]["type"] == "speech.audio.done"
                    assert all(e["type"] == "speech.audio.delta" for e in cut_events[:-1])
                    assert cut_events[-1]["type"] == "error", cut_events[-1]
                    assert cut_events[-1]["error"]["code"] == "unavailable"
                    assert "drain" in cut_events[-1]["error"]["message"]
                assert await asyncio.wait_for(process.wait(), GIVE_UP_S) == 0
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()

    asyncio.run(scenario())
