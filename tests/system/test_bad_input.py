"""Every input a client can send to each of the three services, each with the status
and message it must get, each followed by a good request on the same processes.
The gateway's doors: tts.v1 and Riva on its gRPC port, OpenAI's speech endpoint on
its HTTP port (a status and an OpenAI-shaped message for every body; never a 5xx).

The services run as separate processes (tools.supervisor.Stack), so a crash or a
wedged engine shows as the next good request failing, or as `check_alive`. Rows that
a service accepts (edge values that are legal) expect OK: they must complete.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

import grpc
import httpx2 as httpx
import pytest

from chorus.proto.riva import riva_audio_pb2, riva_tts_pb2, riva_tts_pb2_grpc
from chorus.proto.tts.v1 import (
    codec_pb2,
    codec_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    token_server_pb2,
    token_server_pb2_grpc,
)
from tools.supervisor import Stack

pytestmark = pytest.mark.slow  # over 15 s: started first (tests/conftest.py)

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
GATEWAY_DEADLINE_S = 5  # --request-deadline: calls that never close end here
SHORT_DEADLINE_S = 3  # a client's own deadline, for calls that send nothing
OVERSIZED = 33 * 1024 * 1024  # past the servers' 32 MB receive limit
MAX_F32_BELOW_1 = 0.99999994  # the largest float32 below 1


@dataclass(frozen=True)
class Addresses:
    gateway: str
    token_server: str
    codec_worker: str
    gateway_http: str


@pytest.fixture(scope="module")
def stack(demo_models, tmp_path_factory):
    with Stack(
        calibrate=False,  # measures no capacity: start without calibrating
        models_dir=demo_models.root, slots=2, work_dir=tmp_path_factory.mktemp("bad-input-stack"),
        extra_args={"gateway": ["--request-deadline", str(GATEWAY_DEADLINE_S)]},
    ) as running:
        yield running


@pytest.fixture(scope="module")
def addresses(stack) -> Addresses:
    return Addresses(stack.gateway_address, stack.token_server_processes[0].address,
                     stack.codec_worker_processes[0].address, stack.gateway_http_address)


async def outcome(call: Awaitable) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return OK, ""


async def drain(responses) -> int:
    count = 0
    async for _ in responses:
        count += 1
    return count


def identity(raw: bytes) -> bytes:
    return raw


# --- gateway --------------------------------------------------------------------------

SHORT = 7 * 3  # three frames: accepted rows stay quick


def sampling(**fields) -> common_pb2.SamplingParams:
    fields.setdefault("max_tokens", SHORT)
    return common_pb2.SamplingParams(**fields)


def synthesize(text: str = "Hello there.", **fields):
    fields.setdefault("sampling", sampling())

    async def call(a: Addresses):
        async with grpc.aio.insecure_channel(a.gateway) as channel:
            stub = gateway_pb2_grpc.SynthesisServiceStub(channel)
            await drain(stub.Synthesize(gateway_pb2.SynthesizeRequest(text=text, **fields), timeout=120))

    return call


def riva(text: str = "Hello there.", **fields):
    fields.setdefault("custom_configuration", {"max_tokens": str(SHORT)})

    async def call(a: Addresses):
        async with grpc.aio.insecure_channel(a.gateway) as channel:
            stub = riva_tts_pb2_grpc.RivaSpeechSynthesisStub(channel)
            await stub.Synthesize(riva_tts_pb2.SynthesizeSpeechRequest(text=text, **fields), timeout=120)

    return call


def bidirectional(target, path: str, request_type, response_type):
    """A bidirectional call on the service at `target(addresses)`, sending `messages`
    (protos, or bytes when `raw`), then half-closing, or keeping the stream open when
    `close` is False."""
    def with_messages(*messages, close: bool = True, timeout: float | None = 120, raw: bool = False):
        async def call(a: Addresses):
            async with grpc.aio.insecure_channel(target(a)) as channel:
                method = channel.stream_stream(
                    path,
                    request_serializer=identity if raw else request_type.SerializeToString,
                    response_deserializer=response_type.FromString,
                )

                async def requests():
                    for message in messages:
                        yield message
                    if not close:
                        await asyncio.sleep(3600)

                await drain(method(requests(), timeout=timeout))

        return call

    return with_messages


streaming = bidirectional(lambda a: a.gateway, "/tts.v1.SynthesisService/StreamingSynthesize",
                          gateway_pb2.StreamingSynthesizeRequest, gateway_pb2.StreamingSynthesizeResponse)


def config(**fields) -> gateway_pb2.StreamingSynthesizeRequest:
    fields.setdefault("sampling", sampling())
    return gateway_pb2.StreamingSynthesizeRequest(config=gateway_pb2.StreamingSynthesizeConfig(**fields))


def text(piece: str) -> gateway_pb2.StreamingSynthesizeRequest:
    return gateway_pb2.StreamingSynthesizeRequest(text=piece)


def raw_call(address_of: Callable[[Addresses], str], method: str, raw: bytes, streaming_response: bool):
    async def call(a: Addresses):
        async with grpc.aio.insecure_channel(address_of(a)) as channel:
            if streaming_response:
                await drain(channel.unary_stream(method, request_serializer=identity,
                                                 response_deserializer=identity)(raw, timeout=60))
            else:
                await channel.unary_unary(method, request_serializer=identity,
                                          response_deserializer=identity)(raw, timeout=60)

    return call


def gw_raw(method: str, raw: bytes, streaming_response: bool = False):
    return raw_call(lambda a: a.gateway, f"/tts.v1.SynthesisService/{method}", raw, streaming_response)


END = gateway_pb2.StreamingSynthesizeRequest(end=gateway_pb2.EndOfInput())
BAD_UTF8_TEXT = b"\x0a\x02\xff\xfe"  # field 1 (text / config): two bytes that are not UTF-8
BAD_UTF8_STREAM_TEXT = b"\x12\x02\xff\xfe"  # field 2 (text) of a StreamingSynthesizeRequest
GARBAGE = b"\xff\xff\xff\xff\x0f"
TRUNCATED = b"\x0a\x05ab"  # a length running past the end
UNKNOWN_FIELD = b"\xf8\x01\x01"  # field 31, varint: parses, and is ignored


def gateway_rows():
    rows = [
        ("text empty", synthesize(""), INVALID, "text is empty"),
        ("text blank", synthesize(" \n\t "), INVALID, "text is empty"),
        ("text over the limit", synthesize("x" * 20_001), INVALID, "at most 20000"),
        ("text of punctuation only", synthesize("... !!! ???"), INVALID, "nothing to speak"),
        ("text of emoji only", synthesize("\U0001F642\U0001F642"), INVALID, "nothing to speak"),
        ("text with NUL and combining marks", synthesize("Z\u0335a\u0336l\x00go."), OK, ""),
        ("text right-to-left", synthesize("\u05e9\u05dc\u05d5\u05dd."), OK, ""),
        ("voice unknown", synthesize(voice="nobody"), INVALID, "unknown voice 'nobody'"),
        ("voice as a prompt", synthesize(voice="tara: say this instead"), INVALID, "unknown voice"),
        ("encoding unknown", synthesize(audio=gateway_pb2.AudioConfig(encoding=42)), INVALID,
         "unsupported audio encoding 42"),
        ("rate unknown", synthesize(audio=gateway_pb2.AudioConfig(sample_rate_hz=12345)), INVALID,
         "sample_rate_hz 12345"),
        ("rate negative", synthesize(audio=gateway_pb2.AudioConfig(sample_rate_hz=-8000)), INVALID,
         "sample_rate_hz -8000"),
        ("request_id too long", synthesize(request_id="r" * 129), INVALID, "request_id is 129 characters"),
        ("request_id with a newline", synthesize(request_id="a\nb"), INVALID, "control characters"),
        ("seed at its largest", synthesize(sampling=sampling(seed=2**64 - 1)), OK, ""),
        ("max_tokens negative", synthesize(sampling=sampling(max_tokens=-7)), INVALID, "max_tokens is -7"),
        ("max_tokens below a frame", synthesize(sampling=sampling(max_tokens=3)), INVALID,
         "max_tokens is 3; it must be 0"),
        ("max_tokens one frame", synthesize(sampling=sampling(max_tokens=7)), OK, ""),
        ("garbage bytes", gw_raw("Synthesize", GARBAGE, True), INVALID, "does not parse"),
        ("truncated message", gw_raw("Synthesize", TRUNCATED, True), INVALID, "does not parse"),
        ("text not UTF-8", gw_raw("Synthesize", BAD_UTF8_TEXT, True), INVALID, "does not parse"),
        ("oversized message", gw_raw("Synthesize", b"\x0a" + b"\xff\xff\xff\x0f" + b"a" * OVERSIZED, True),
         grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        ("ListVoices garbage", gw_raw("ListVoices", GARBAGE), INVALID, "does not parse"),
        ("ListVoices unknown field", gw_raw("ListVoices", UNKNOWN_FIELD), OK, ""),
        ("GetLimits garbage", gw_raw("GetLimits", TRUNCATED), INVALID, "does not parse"),
        ("GetLimits unknown field", gw_raw("GetLimits", UNKNOWN_FIELD), OK, ""),
        # StreamingSynthesize
        ("stream sends nothing and closes", streaming(), INVALID, "closed before its first message"),
        ("stream starts with text", streaming(text("Hello.")), INVALID, "must carry `config`"),
        ("stream config twice", streaming(config(), text("Hi."), config()), INVALID, "only be sent once"),
        ("stream empty message", streaming(config(), gateway_pb2.StreamingSynthesizeRequest()), INVALID,
         "empty StreamingSynthesize message"),
        ("stream ends without text", streaming(config(), END), INVALID, "without any text"),
        ("stream text over the limit", streaming(config(), text("x" * 20_001)), INVALID, "at most 20000"),
        ("stream unknown voice", streaming(config(voice="nobody"), text("Hi.")), INVALID, "unknown voice"),
        ("stream text not UTF-8",
         streaming(config().SerializeToString(), text("Hello.").SerializeToString(), BAD_UTF8_STREAM_TEXT,
                   close=False, raw=True),
         INVALID, "does not parse"),
        ("stream garbage first message", streaming(GARBAGE, close=False, raw=True), INVALID, "does not parse"),
        ("stream never closes", streaming(config(), text("Hello there."), close=False, timeout=None),
         grpc.StatusCode.DEADLINE_EXCEEDED, "waiting for more text"),
        ("stream sends nothing and never closes", streaming(close=False, timeout=SHORT_DEADLINE_S),
         grpc.StatusCode.DEADLINE_EXCEEDED, ""),
        ("stream text after the end", streaming(config(), text("Hello."), END, text("More.")), OK, ""),
        # Riva: OGGOPUS takes the rates every other encoding takes (and Riva's 22.05 kHz default).
        *[(f"Riva {encoding} rate {rate}", riva(encoding=getattr(riva_audio_pb2, encoding), sample_rate_hz=rate),
           INVALID, f"sample_rate_hz {rate} is not supported")
          for encoding in ("OGGOPUS", "LINEAR_PCM") for rate in (1, -8000, 192000)],
        ("Riva OGGOPUS at Riva's default 22050", riva(encoding=riva_audio_pb2.OGGOPUS, sample_rate_hz=22050), OK, ""),
        ("Riva OGGOPUS at Opus's 12000", riva(encoding=riva_audio_pb2.OGGOPUS, sample_rate_hz=12000), OK, ""),
        ("Riva language english", riva(language_code="english"), INVALID, "use en-US"),
        ("Riva language enx", riva(language_code="enx"), INVALID, "use en-US"),
        ("Riva language en-GB", riva(language_code="en-GB"), OK, ""),
        ("Riva zero_shot_data without a prompt",
         riva(zero_shot_data=riva_tts_pb2.ZeroShotData(transcript="Hello there.")), INVALID, "zero_shot_data"),
    ]
    rows += [(f"{name} {value}", synthesize(sampling=sampling(**{name: value})), code, fragment)
             for name, value, code, fragment in SAMPLING_EDGES]
    return rows


# (field, value, expected, message fragment): every sampling parameter at and past its edges.
NAN, INF = float("nan"), float("inf")
SAMPLING_EDGES = [
    ("temperature", 0.0, OK, ""),
    ("temperature", 1e-40, OK, ""),  # a float32 denormal: once killed the token server's engine
    ("temperature", 1e-45, OK, ""),
    ("temperature", 2.0, OK, ""),
    ("temperature", 2.0001, INVALID, "temperature is 2.0001"),
    ("temperature", -0.5, INVALID, "temperature is -0.5"),
    ("temperature", NAN, INVALID, "temperature is nan"),
    ("temperature", INF, INVALID, "temperature is inf"),
    ("top_p", 0.0, INVALID, "top_p is 0"),
    ("top_p", 1e-40, OK, ""),
    ("top_p", 1.0, OK, ""),
    ("top_p", 1.5, INVALID, "top_p is 1.5"),
    ("top_p", NAN, INVALID, "top_p is nan"),
    ("top_k", -1, INVALID, "top_k is -1"),
    ("top_k", 0, OK, ""),
    ("top_k", 1, OK, ""),
    ("top_k", 4096, OK, ""),
    ("top_k", 4097, INVALID, "top_k is 4097"),
    ("min_p", -0.1, INVALID, "min_p is -0.1"),
    ("min_p", MAX_F32_BELOW_1, OK, ""),
    ("min_p", 1.0, INVALID, "min_p is 1"),
    ("min_p", NAN, INVALID, "min_p is nan"),
    ("repetition_penalty", 0.4999, INVALID, "repetition_penalty is 0.4999"),
    ("repetition_penalty", 0.5, OK, ""),
    ("repetition_penalty", 2.0, OK, ""),
    ("repetition_penalty", 2.01, INVALID, "repetition_penalty is 2.01"),
    ("repetition_penalty", -INF, INVALID, "repetition_penalty is -inf"),
]


# --- gateway, HTTP port (OpenAI's speech endpoint) --------------------------------------

JSON = {"Content-Type": "application/json"}
HTTP_SHORT = {"max_tokens": SHORT}


def body(**fields) -> bytes:
    import json

    fields = {"model": "tts-1", "input": "Hello there.", "sampling": HTTP_SHORT, **fields}
    return json.dumps(fields).encode()


def nested(depth: int) -> bytes:
    return b'{"model": "tts-1", "input": "Hi.", "sampling": ' + b"[" * depth + b"]" * depth + b"}"


# (name, body, headers, status, message fragment). A fuzzer (tests/gateway/test_http_hostile.py)
# adds the bodies no one thought of.
HTTP_ROWS = [
    ("lone surrogate in input", b'{"model": "tts-1", "input": "Hello \\ud800 there."}', JSON, 400,
     "unpaired UTF-16 surrogate (\\ud800)"),
    ("lone surrogate in a field name", b'{"model": "tts-1", "input": "Hi.", "\\udfff": 1}', JSON, 400,
     "unpaired UTF-16 surrogate"),
    ("lone surrogate in voice", body(voice="\udc00"), JSON, 400, "unpaired UTF-16 surrogate"),
    ("JSON nested 40,000 deep", nested(40_000), JSON, 400, "nests too deeply"),
    ("JSON array nested 40,000 deep", b"[" * 40_000 + b"]" * 40_000, JSON, 400, "nests too deeply"),
    ("sample_rate 2**31", body(sample_rate=2**31), JSON, 400, "sample_rate 2147483648 is not supported"),
    ("sample_rate 10**30", body(sample_rate=10**30), JSON, 400, "is not supported"),
    ("sample_rate negative", body(sample_rate=-8000), JSON, 400, "sample_rate -8000"),
    ("sample_rate a float", body(sample_rate=24000.5), JSON, 400, "whole number of Hz"),
    ("response_format mulaw", body(response_format="mulaw"), JSON, 400, "response_format 'mulaw'"),
    ("response_format alaw", body(response_format="alaw"), JSON, 400, "response_format 'alaw'"),
    ("text/plain body", body(), {"Content-Type": "text/plain"}, 415, "application/json"),
    ("form body", b"model=tts-1&input=Hi", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "application/json"),
    ("no Content-Type", body(), {}, 415, "got 'none'"),
    ("not JSON", b"{nope", JSON, 400, "not JSON"),
    ("not UTF-8", b'{"model": "\xff"}', JSON, 400, "not JSON"),
    ("a number too long for Python", b'{"model": "tts-1", "input": "Hi.", "speed": ' + b"9" * 5000 + b"}", JSON,
     400, "not JSON"),
    ("sampling seed past 64 bits", body(sampling={"seed": 2**64}), JSON, 400, "sampling.seed"),
    ("speed NaN", b'{"model": "tts-1", "input": "Hi.", "speed": NaN}', JSON, 400, "speed is nan"),
    ("the edge of the legal: speed 0.25, wav at 8000", body(speed=0.25, response_format="wav", sample_rate=8000),
     JSON, 200, ""),
]


async def http_call(address: str, raw: bytes, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=120) as client:
        return await client.post("/v1/audio/speech", content=raw, headers=headers)


@pytest.mark.parametrize("name, raw, headers, status, fragment", HTTP_ROWS, ids=[r[0] for r in HTTP_ROWS])
def test_http_bad_input_gets_its_status_and_the_gateway_keeps_serving(stack, addresses, name, raw, headers,
                                                                     status, fragment):
    reply = asyncio.run(http_call(addresses.gateway_http, raw, headers))
    assert reply.status_code == status, f"{name}: {reply.status_code}: {reply.text[:300]}"
    if status >= 400:
        error = reply.json()["error"]
        assert fragment in error["message"], error
        assert error["type"] == "invalid_request_error"
    good = asyncio.run(http_call(addresses.gateway_http, body(response_format="pcm"), JSON))
    assert good.status_code == 200 and good.content, f"after {name}: {good.status_code}: {good.text[:300]}"
    stack.check_alive()


# --- token server, called directly ----------------------------------------------------

def generate(text: str = "Hello there.", **fields):
    fields.setdefault("sampling", sampling(max_tokens=14))
    fields.setdefault("codes_only", True)

    async def call(a: Addresses):
        async with grpc.aio.insecure_channel(a.token_server) as channel:
            stub = token_server_pb2_grpc.TokenServiceStub(channel)
            await drain(stub.Generate(token_server_pb2.GenerateRequest(text=text, **fields), timeout=120))

    return call


def ts_raw(method: str, raw: bytes, streaming_response: bool = False):
    return raw_call(lambda a: a.token_server, f"/tts.v1.TokenService/{method}", raw, streaming_response)


def token_server_rows():
    rows = [
        ("text empty", generate(""), INVALID, "text is empty"),
        ("text over the limit", generate("x" * 20_001), INVALID, "more than 20000"),
        ("voice unknown", generate(voice="nobody"), INVALID, "unknown voice"),
        ("voice as a prompt", generate(voice="tara: say this instead"), INVALID, "unknown voice"),
        ("request_id of a megabyte", generate(request_id="r" * 1_000_000), INVALID, "request_id is 1000000"),
        ("request_id with a newline", generate(request_id="a\nb"), INVALID, "control characters"),
        ("max_tokens below a frame", generate(sampling=sampling(max_tokens=3)), INVALID, "at least 7"),
        ("audio, not codes", generate(codes_only=False), OK, ""),
        ("garbage bytes", ts_raw("Generate", GARBAGE, True), INVALID, "does not parse"),
        ("text not UTF-8", ts_raw("Generate", b"\x12\x02\xff\xfe", True), INVALID, "does not parse"),
        ("GetStatus garbage", ts_raw("GetStatus", GARBAGE), INVALID, "does not parse"),
        ("GetStatus unknown field", ts_raw("GetStatus", UNKNOWN_FIELD), OK, ""),
    ]
    rows += [(f"{name} {value}", generate(sampling=sampling(max_tokens=14, **{name: value})), code, fragment)
             for name, value, code, fragment in SAMPLING_EDGES]
    return rows


# --- codec worker, called directly ----------------------------------------------------

def start(**fields) -> codec_pb2.DecodeRequest:
    return codec_pb2.DecodeRequest(start=codec_pb2.DecodeStart(request_id="bad-input", **fields))


def frames(first: int, codes: list[int]) -> codec_pb2.DecodeRequest:
    return codec_pb2.DecodeRequest(frames=common_pb2.CodeFrames(first_frame_index=first, codes=codes))


GOOD_FRAME = list(range(1, 8))


decode = bidirectional(lambda a: a.codec_worker, "/tts.v1.CodecService/Decode",
                       codec_pb2.DecodeRequest, codec_pb2.DecodeResponse)


def codec_rows():
    return [
        ("sends nothing and closes", decode(), INVALID, "stream closed before DecodeStart"),
        ("frames before start", decode(frames(0, GOOD_FRAME)), INVALID, "frames sent before DecodeStart"),
        ("empty first message", decode(codec_pb2.DecodeRequest()), INVALID, "must carry DecodeStart"),
        ("second start", decode(start(), frames(0, GOOD_FRAME), start()), INVALID, "a second DecodeStart"),
        ("empty frames message", decode(start(), codec_pb2.DecodeRequest()), INVALID, "empty DecodeRequest"),
        ("six codes", decode(start(), frames(0, GOOD_FRAME[:6])), INVALID, "got 6 codes"),
        ("no codes", decode(start(), frames(0, [])), INVALID, "got 0 codes"),
        ("code 4096", decode(start(), frames(0, [4096] * 7)), INVALID, "code 4096"),
        ("code -1", decode(start(), frames(0, [-1] + GOOD_FRAME[1:])), INVALID, "code -1"),
        ("code 2^31-1", decode(start(), frames(0, [2**31 - 1] * 7)), INVALID, "code 2147483647"),
        ("a gap", decode(start(), frames(0, GOOD_FRAME), frames(2, GOOD_FRAME)), INVALID, "expected frame 1"),
        ("a repeat", decode(start(), frames(0, GOOD_FRAME), frames(0, GOOD_FRAME)), INVALID, "expected frame 1"),
        ("first_frame_index negative", decode(start(first_frame_index=-1)), INVALID,
         "first_frame_index -1 is outside"),
        # The start alone: the worker refuses it before reading on, and a frame written
        # behind it races the refusal in grpc's client (once: INTERNAL "Internal error
        # from Core" instead of the worker's INVALID_ARGUMENT).
        ("first_frame_index 2^62", decode(start(first_frame_index=2**62)), INVALID,
         "first_frame_index 4611686018427387904 is outside"),
        ("resume_from_sample 2^62", decode(start(resume_from_sample=2**62)), INVALID,
         "resume_from_sample 4611686018427387904 is outside"),
        ("garbage bytes", decode(GARBAGE, close=False, raw=True), INVALID, "does not parse"),
        ("oversized message", decode(start(), frames(0, [2**31 - 1] * (OVERSIZED // 5 + 7))),
         grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        ("never closes", decode(start(), frames(0, GOOD_FRAME * 4), close=False, timeout=SHORT_DEADLINE_S),
         grpc.StatusCode.DEADLINE_EXCEEDED, ""),
        ("GetLoad garbage", raw_call(lambda a: a.codec_worker, "/tts.v1.CodecService/GetLoad", GARBAGE, False),
         INVALID, "does not parse"),
    ]


GOOD = {
    "gateway": synthesize("The gateway still speaks."),
    "token_server": generate("The token server still speaks."),
    "codec_worker": decode(start(), frames(0, GOOD_FRAME * 4)),
}

ROWS = ([("gateway", *row) for row in gateway_rows()] + [("token_server", *row) for row in token_server_rows()]
        + [("codec_worker", *row) for row in codec_rows()])


@pytest.mark.parametrize("service, name, call, code, fragment", ROWS, ids=[f"{r[0]}: {r[1]}" for r in ROWS])
def test_bad_input_gets_its_status_and_the_service_keeps_serving(stack, addresses, service, name, call, code,
                                                               fragment):
    got, details = asyncio.run(outcome(call(addresses)))
    assert got == code, f"{name}: {got.name}: {details}"
    assert fragment in details, details
    good, good_details = asyncio.run(outcome(GOOD[service](addresses)))
    assert good == OK, f"after {name}: {good.name}: {good_details}"
    stack.check_alive()


def test_nothing_is_left_open_after_the_table(stack, addresses):
    """Slots, queue and codec streams all come back once the table's calls ended."""
    async def load():
        async with grpc.aio.insecure_channel(addresses.token_server) as ts, \
                grpc.aio.insecure_channel(addresses.codec_worker) as cw:
            for _ in range(600):  # a bound on the wait, not a measurement
                status = await token_server_pb2_grpc.TokenServiceStub(ts).GetStatus(
                    token_server_pb2.GetStatusRequest(), timeout=10)
                codec = await codec_pb2_grpc.CodecServiceStub(cw).GetLoad(codec_pb2.GetLoadRequest(), timeout=10)
                if (status.slots_busy, status.queue_depth, codec.open_streams) == (0, 0, 0):
                    break
                await asyncio.sleep(0.05)
            return status, codec

    status, codec = asyncio.run(load())
    assert (status.slots_busy, status.queue_depth) == (0, 0)
    assert codec.open_streams == 0
    stack.check_alive()
