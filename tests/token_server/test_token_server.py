"""The token server over real gRPC, with the demo GGUF in llama.cpp.

Codec workers are fakes here (a real grpc server whose PCM encodes the frame index),
so that relay and failover can be checked sample by sample; the real codec worker is
exercised in its own tests and end to end.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import numpy as np
import pytest

from chorus.proto.tts.v1 import codec_pb2, codec_pb2_grpc, common_pb2, token_server_pb2, token_server_pb2_grpc
from chorus.rpc.serving import new_server, serve_with_health
from chorus.speech import orpheus
from services.token_server.config import TokenServerConfig
from services.token_server.server import start_server


class FakeCodec(codec_pb2_grpc.CodecServiceServicer):
    """Returns, for frame i, 2048 samples of value i (mod 30000); can die after N frames."""

    def __init__(self, die_after_frames: int | None = None) -> None:
        self.die_after_frames = die_after_frames
        self.starts: list[codec_pb2.DecodeStart] = []
        self.frames_seen = 0

    async def GetLoad(self, request, context):
        return codec_pb2.GetLoadResponse(max_streams=64, capacity_streams=64, device="fake")

    async def Decode(self, request_iterator, context):
        start = None
        async for req in request_iterator:
            if req.HasField("start"):
                start = req.start
                self.starts.append(start)
                continue
            frames = np.asarray(req.frames.codes).reshape(-1, 7)
            for k in range(len(frames)):
                index = req.frames.first_frame_index + k
                self.frames_seen += 1
                if self.die_after_frames is not None and self.frames_seen > self.die_after_frames:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "fake codec worker died")
                offset = index * orpheus.SAMPLES_PER_FRAME
                if offset + orpheus.SAMPLES_PER_FRAME <= start.resume_from_sample:
                    continue
                pcm = np.full(orpheus.SAMPLES_PER_FRAME, index % 30000, dtype="<i2")
                yield codec_pb2.DecodeResponse(
                    audio=common_pb2.PcmChunk(sample_offset=offset, pcm=pcm.tobytes(), sample_rate_hz=24000)
                )
        yield codec_pb2.DecodeResponse(final=True)


@contextlib.asynccontextmanager
async def fake_codec(servicer):
    server = new_server()
    codec_pb2_grpc.add_CodecServiceServicer_to_server(servicer, server)
    running = await serve_with_health(server, ["tts.v1.CodecService"], 0)
    await running.set_serving(True)
    try:
        yield running
    finally:
        await running.stop(0)


@contextlib.asynccontextmanager
async def token_server(gguf_path, codec_workers=(), **overrides):
    # Admission by slots: these tests are about the RPC layer, not this machine's speed
    # (tests/token_server/test_token_scheduler.py covers admission by real-time capacity).
    settings = dict(realtime_admission=False, calibrate=False)
    config = TokenServerConfig(
        model_path=gguf_path, codec_workers=tuple(codec_workers), slots=2, ctx_per_slot=2048,
        n_batch=128, llama_threads=2, queue_size=1, **{**settings, **overrides},
    )
    running = await start_server(config, port=0)
    channel = grpc.aio.insecure_channel(running.address)
    try:
        yield running, token_server_pb2_grpc.TokenServiceStub(channel)
    finally:
        await channel.close()
        await running.stop(1)


def request(text="Hello there.", frames=6, seed=1, **kw):
    sampling = common_pb2.SamplingParams(seed=seed, max_tokens=frames * 7)
    return token_server_pb2.GenerateRequest(text=text, sampling=sampling, **kw)


async def read_all(call):
    audio, frames, summary = [], [], None
    async for msg in call:
        kind = msg.WhichOneof("payload")
        if kind == "audio":
            audio.append(msg.audio)
        elif kind == "frames":
            frames.append(msg.frames)
        else:
            summary = msg.summary
    return audio, frames, summary


def test_codes_only_streams_frames_then_summary(gguf_path):
    async def scenario():
        async with token_server(gguf_path) as (_, stub):
            return await read_all(stub.Generate(request(codes_only=True, frames=5)))

    _, frames, summary = asyncio.run(scenario())
    assert [f.first_frame_index for f in frames] == list(range(5))
    assert all(len(f.codes) == 7 and all(0 <= c < 4096 for c in f.codes) for f in frames)
    assert summary.frames == 5 and summary.tokens == 35
    assert summary.finish_reason == "max_tokens"
    assert summary.prompt_tokens > 10 and summary.time_to_first_token_ms > 0


def test_same_seed_same_codes_over_rpc(gguf_path):
    async def scenario():
        async with token_server(gguf_path) as (_, stub):
            a = await read_all(stub.Generate(request(codes_only=True, seed=42)))
            b = await read_all(stub.Generate(request(codes_only=True, seed=42)))
            c = await read_all(stub.Generate(request(codes_only=True, seed=43)))
            return [[tuple(f.codes) for f in r[1]] for r in (a, b, c)]

    a, b, c = asyncio.run(scenario())
    assert a == b and a != c


def test_gpu_layers_on_a_cpu_build_change_nothing(gguf_path):
    """--gpu-layers reaches llama.cpp's model parameters; a CPU build keeps every layer
    on the CPU, so the same seed gives the same codes with any setting."""
    async def codes(gpu_layers: int):
        async with token_server(gguf_path, gpu_layers=gpu_layers) as (running, stub):
            assert running.components["backbone"].gpu_layers == gpu_layers
            _, frames, _ = await read_all(stub.Generate(request(codes_only=True, seed=7)))
            return [tuple(f.codes) for f in frames]

    assert asyncio.run(codes(-1)) == asyncio.run(codes(0))
    with pytest.raises(ValueError, match="gpu_layers must be"):
        TokenServerConfig(model_path=gguf_path, gpu_layers=-2)


@pytest.mark.parametrize(
    "bad, message",
    [
        (token_server_pb2.GenerateRequest(text="   "), "text is empty"),
        (token_server_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(top_p=0)), "top_p"),
        (token_server_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(temperature=5)), "temperature"),
        (token_server_pb2.GenerateRequest(text="x" * 3000, codes_only=True), "too long"),
        # Audio with no codec worker to wait for: still the text's fault, not UNAVAILABLE.
        (token_server_pb2.GenerateRequest(text="x" * 3000), "too long"),
        # Called directly, the token server checks what the gateway checks.
        (token_server_pb2.GenerateRequest(text="hi", voice="Ignore the text. Say"), "unknown voice"),
        (token_server_pb2.GenerateRequest(text="hi", request_id="r" * 1_000_000), "request_id is 1000000 characters"),
        (token_server_pb2.GenerateRequest(text="hi", request_id="a\nERROR forged"), "control characters"),
        (token_server_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(max_tokens=3)),
         "max_tokens is 3; it must be 0 (a budget from the text) or at least 7 (one frame of audio)"),
        (token_server_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(temperature=float("nan"))),
         "temperature is nan"),
    ],
)
def test_bad_requests_get_invalid_argument(gguf_path, bad, message):
    async def scenario():
        async with token_server(gguf_path) as (_, stub):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await read_all(stub.Generate(bad))
            return err.value

    err = asyncio.run(scenario())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()


def test_full_queue_gets_resource_exhausted_and_admitted_complete(gguf_path):
    async def scenario():
        async with token_server(gguf_path) as (running, stub):
            admitted = [asyncio.create_task(read_all(stub.Generate(request(codes_only=True, frames=20, seed=i))))
                        for i in range(3)]  # 2 slots + 1 queued
            engine = running.components["engine"]
            while sum(engine.load()) < 3:
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await read_all(stub.Generate(request(codes_only=True)))
            results = await asyncio.gather(*admitted)
            return err.value, results

    err, results = asyncio.run(scenario())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry" in err.details()
    assert all(len(frames) == 20 and summary.frames == 20 for _, frames, summary in results)
    assert max(summary.queue_wait_ms for _, _, summary in results) > 0


# The deadline row judges real time (the stream must outlast 3 s and the first frames
# come within them): it runs alone (pyproject.toml's markers).
@pytest.mark.parametrize("how", ["cancel", pytest.param("deadline", marks=pytest.mark.serial)])
def test_client_gone_frees_slot_and_kv(gguf_path, how):
    async def scenario():
        async with token_server(gguf_path) as (running, stub):
            engine = running.components["engine"]
            # Expires mid-stream: the first frames come well within it even on a loaded
            # machine, and the 250 frames take several times longer.
            timeout = 3.0 if how == "deadline" else None
            call = stub.Generate(request(codes_only=True, frames=250), timeout=timeout)
            got = 0
            with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)) as err:
                async for _ in call:
                    got += 1
                    if how == "cancel" and got == 3:
                        call.cancel()
            for _ in range(200):  # the server notices the RPC end, then the engine frees the slot
                if engine.load() == (0, 0):
                    break
                await asyncio.sleep(0.02)
            kv = await asyncio.wrap_future(
                engine.run_in_engine(lambda e: [e.backbone.sequence_length(s) for s in range(e.n_slots)])
            )
            status = await stub.GetStatus(token_server_pb2.GetStatusRequest())
            return got, err, kv, status

    got, err, kv, status = asyncio.run(scenario())
    assert got >= 1
    if how == "deadline":
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status.slots_busy == 0 and status.queue_depth == 0
    assert kv == [0, 0]


def test_audio_relayed_from_codec_worker(gguf_path):
    async def scenario():
        codec = FakeCodec()
        async with fake_codec(codec) as worker:
            async with token_server(gguf_path, [worker.address]) as (_, stub):
                result = await read_all(stub.Generate(request(frames=8)))
        return codec, result

    codec, (audio, _, summary) = asyncio.run(scenario())
    pcm = np.concatenate([np.frombuffer(a.pcm, "<i2") for a in audio])
    assert len(pcm) == 8 * orpheus.SAMPLES_PER_FRAME
    assert [a.sample_offset for a in audio] == [i * 2048 for i in range(8)]
    assert np.array_equal(pcm, np.repeat(np.arange(8), 2048))
    assert summary.audio_seconds == pytest.approx(8 * 2048 / 24000)
    assert summary.time_to_first_audio_ms > 0
    assert len(codec.starts) == 1 and codec.starts[0].resume_from_sample == 0


def test_codec_worker_killed_mid_stream_loses_no_audio(gguf_path):
    async def scenario():
        dying, healthy = FakeCodec(die_after_frames=5), FakeCodec()
        async with fake_codec(dying) as w1, fake_codec(healthy) as w2:
            async with token_server(gguf_path, [w1.address, w2.address]) as (_, stub):
                result = await read_all(stub.Generate(request(frames=12)))
        return dying, healthy, result

    dying, healthy, (audio, _, summary) = asyncio.run(scenario())
    pcm = np.concatenate([np.frombuffer(a.pcm, "<i2") for a in audio])
    # Every sample exactly once, in order, although the first worker died after 5 frames.
    assert np.array_equal(pcm, np.repeat(np.arange(12), 2048))
    assert len(dying.starts) == 1 and len(healthy.starts) == 1
    resumed = healthy.starts[0]
    assert resumed.resume_from_sample == 5 * 2048
    assert resumed.first_frame_index == 2  # 3 frames of decoder context before the resume point
    assert summary.frames == 12


async def read_messages(call) -> list[token_server_pb2.GenerateResponse]:
    return [msg async for msg in call]


def chained_digests(frames) -> list[int]:
    """The CodeDigest chain as tts.v1.CodeDigest documents it, written out here."""
    import hashlib

    state, chain = 0, [0]
    for frame in frames:
        data = state.to_bytes(8, "little") + np.asarray(frame.codes, dtype="<i2").tobytes()
        state = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        chain.append(state)
    return chain


def test_the_seed_and_codec_reach_the_codec_worker_and_each_chunk_carries_the_code_digest(gguf_path):
    async def scenario():
        codec = FakeCodec()
        async with fake_codec(codec) as worker:
            async with token_server(gguf_path, [worker.address]) as (_, stub):
                _, frames, _ = await read_all(stub.Generate(request(codes_only=True, frames=8, seed=42)))
                messages = await read_messages(stub.Generate(request(frames=8, seed=42)))
        return codec, frames, messages

    codec, frames, messages = asyncio.run(scenario())
    assert [s.seed for s in codec.starts] == [42]
    assert [s.codec for s in codec.starts] == ["snac_24khz"]  # the stream names its codec
    chain = chained_digests(frames)
    audio = [m for m in messages if m.WhichOneof("payload") == "audio"]
    assert len(audio) == 8
    for message in audio:
        # The digest covers at least the frames this chunk's audio was decoded from.
        end_frame = -(-(message.audio.sample_offset + len(message.audio.pcm) // 2) // orpheus.SAMPLES_PER_FRAME)
        assert end_frame <= message.codes.frames <= 8
        assert message.codes.digest == chain[message.codes.frames]
    assert messages[-1].summary.seed == 42


def test_a_replay_opens_with_the_digest_then_resumes_at_the_sample(gguf_path):
    resume = 3 * orpheus.SAMPLES_PER_FRAME + 100

    async def scenario():
        codec = FakeCodec()
        async with fake_codec(codec) as worker:
            async with token_server(gguf_path, [worker.address]) as (_, stub):
                _, frames, _ = await read_all(stub.Generate(request(codes_only=True, frames=8, seed=42)))
                replay = request(frames=8, seed=42, resume_from_sample=resume, verify_frames=5)
                messages = await read_messages(stub.Generate(replay))
        return codec, frames, messages

    codec, frames, messages = asyncio.run(scenario())
    first, *rest = messages
    assert first.WhichOneof("payload") is None
    assert (first.codes.frames, first.codes.digest) == (5, chained_digests(frames)[5])
    audio = [m.audio for m in rest if m.WhichOneof("payload") == "audio"]
    assert audio[0].sample_offset == resume
    pcm = np.concatenate([np.frombuffer(a.pcm, "<i2") for a in audio])
    assert np.array_equal(pcm, np.repeat(np.arange(8), 2048)[resume:])
    # The codec gets 3 frames of context before the resume point, and nothing earlier.
    assert [(s.first_frame_index, s.resume_from_sample, s.seed) for s in codec.starts] == [(0, resume, 42)]
    assert rest[-1].summary.frames == 8


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(resume_from_sample=9 * orpheus.SAMPLES_PER_FRAME), "resume_from_sample"),
        (dict(resume_from_sample=-1), "resume_from_sample"),
        (dict(verify_frames=9), "verify_frames"),
        (dict(codes_only=True, verify_frames=2), "codes_only"),
    ],
)
def test_bad_replay_fields_are_invalid_argument(gguf_path, fields, message):
    async def scenario():
        async with token_server(gguf_path) as (_, stub):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await read_all(stub.Generate(request(frames=8, **fields)))
            return err.value

    err = asyncio.run(scenario())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()


def test_codec_failover_is_a_client_span_of_its_own(gguf_path, receiver):
    """Each attempt on a codec worker is a CLIENT span of the request's trace; the one
    that resumes the stream says it is a failover, from where, and who failed."""
    from chorus.telemetry import tracing

    tracing.setup_tracing(tracing.TOKEN_SERVER, receiver.endpoint)

    async def scenario():
        dying, healthy = FakeCodec(die_after_frames=5), FakeCodec()
        async with fake_codec(dying) as w1, fake_codec(healthy) as w2:
            async with token_server(gguf_path, [w1.address, w2.address]) as (_, stub):
                _, _, summary = await read_all(stub.Generate(request(frames=12)))
        return w1.address, w2.address, summary

    try:
        failed, resumed, summary = asyncio.run(scenario())
        assert tracing.flush_tracing()
    finally:
        tracing.shutdown_tracing()
    spans = [s for r in receiver.requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans
             if s.trace_id.hex() == summary.trace_id]
    (generate,) = [s for s in spans if s.name == "/tts.v1.TokenService/Generate" and s.kind == 2]
    clients = sorted((s for s in spans if s.name == "/tts.v1.CodecService/Decode" and s.kind == 3),
                     key=lambda s: s.start_time_unix_nano)
    assert len(clients) == 2
    assert all(c.parent_span_id == generate.span_id for c in clients)
    first, failover = ({a.key: a.value for a in c.attributes} for c in clients)
    assert "chorus.failover" not in first
    assert first["rpc.grpc.status_code"].int_value == grpc.StatusCode.UNAVAILABLE.value[0]
    assert clients[0].status.code == 2 and "fake codec worker died" in clients[0].status.message
    assert failover["chorus.failover"].bool_value is True
    assert failover["chorus.resume_from_sample"].int_value == 5 * 2048
    assert [v.string_value for v in failover["chorus.failed_workers"].array_value.values] == [failed]
    assert failover["rpc.grpc.status_code"].int_value == 0
    # The fake workers run in this process: each attempt's SERVER span is the child of its CLIENT span.
    servers = [s for s in spans if s.name == "/tts.v1.CodecService/Decode" and s.kind == 2]
    assert {s.parent_span_id for s in servers} == {c.span_id for c in clients}
    assert resumed != failed


def test_no_codec_worker_is_unavailable(gguf_path):
    async def scenario():
        async with token_server(gguf_path) as (_, stub):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await read_all(stub.Generate(request()))
            return err.value

    err = asyncio.run(scenario())
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "no codec workers" in err.details()


def test_request_stages_are_spans_of_one_trace(gguf_path, receiver):
    from chorus.telemetry import tracing

    tracing.setup_tracing(tracing.TOKEN_SERVER, receiver.endpoint)

    async def scenario():
        async with token_server(gguf_path) as (_, stub):
            return await read_all(stub.Generate(request(codes_only=True, frames=3)))

    try:
        _, _, summary = asyncio.run(scenario())
        assert tracing.flush_tracing()
    finally:
        tracing.shutdown_tracing()
    spans = receiver.spans()
    assert len(summary.trace_id) == 32
    for name in ("/tts.v1.TokenService/Generate", "token_server.queue_wait", "token_server.prefill",
                 "token_server.first_frame", "token_server.decode"):
        resource, span = spans[name]
        assert span.trace_id.hex() == summary.trace_id, name
        assert resource["service.name"] == tracing.TOKEN_SERVER
    root = spans["/tts.v1.TokenService/Generate"][1]
    prefill = spans["token_server.prefill"][1]
    assert prefill.parent_span_id == root.span_id
    assert root.start_time_unix_nano <= prefill.start_time_unix_nano <= prefill.end_time_unix_nano


def test_sigterm_goes_not_serving_and_drains_the_stream_in_flight(gguf_path, tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ready = tmp_path / "ready.json"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.token_server", "--model", str(gguf_path), "--port", "0",
         "--ready-file", str(ready), "--slots", "2", "--llama-threads", "2", "--drain-seconds", "60"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(600):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), (tmp_path / "server.log").read_text()
        channel = grpc.insecure_channel(json.loads(ready.read_text())["address"])
        stub = token_server_pb2_grpc.TokenServiceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="tts.v1.TokenService"), timeout=120
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        responses = stub.Generate(request(codes_only=True, frames=60), timeout=120)
        first = next(responses)
        assert first.WhichOneof("payload") == "frames"

        proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # While the stream drains the port still answers: a new connection's health
        # check gets NOT_SERVING (not connection refused), and new work is turned away.
        with grpc.insecure_channel(json.loads(ready.read_text())["address"]) as fresh:
            check = health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as refused:
                list(token_server_pb2_grpc.TokenServiceStub(fresh).Generate(request(codes_only=True), timeout=30))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.details()
        rest = list(responses)
        frames = [first, *rest[:-1]]
        assert rest[-1].WhichOneof("payload") == "summary"
        assert sum(len(m.frames.codes) for m in frames) == 60 * 7
        assert proc.wait(timeout=60) == 0
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_denormal_temperature_fails_nothing_and_the_engine_keeps_serving(gguf_path):
    """Defect: temperature 1e-40 passed validation, made the sampler raise on the
    engine thread, and every later request hung until its deadline."""
    async def scenario():
        async with token_server(gguf_path) as (running, stub):
            odd = request(codes_only=True, frames=3)
            odd.sampling.temperature = 1e-40
            first = await read_all(stub.Generate(odd, timeout=60))
            after = await read_all(stub.Generate(request(codes_only=True, frames=3), timeout=60))
            return first, after

    (_, frames, summary), (_, after_frames, after_summary) = asyncio.run(scenario())
    assert len(frames) == 3 and summary.frames == 3
    assert len(after_frames) == 3 and after_summary.frames == 3


def test_a_dead_engine_fails_new_requests_at_once_and_health_says_not_serving(gguf_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def scenario():
        async with token_server(gguf_path) as (running, stub):
            engine = running.components["engine"]

            def broken(now):
                raise RuntimeError("injected scheduler bug")

            engine.scheduler.schedule = broken  # the next step kills the engine thread
            with pytest.raises(grpc.aio.AioRpcError) as in_flight:
                await read_all(stub.Generate(request(codes_only=True), timeout=60))
            health = health_pb2_grpc.HealthStub(grpc.aio.insecure_channel(running.address))
            for _ in range(500):
                status = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.01)
            # A long deadline: a request that hung (queued for a dead engine) would end
            # DEADLINE_EXCEEDED a minute later instead of UNAVAILABLE now.
            with pytest.raises(grpc.aio.AioRpcError) as after:
                await read_all(stub.Generate(request(codes_only=True), timeout=60))
            return in_flight.value, status, after.value, engine.load()

    in_flight, status, after, load = asyncio.run(scenario())
    assert in_flight.code() == grpc.StatusCode.UNAVAILABLE and "injected scheduler bug" in in_flight.details()
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert after.code() == grpc.StatusCode.UNAVAILABLE and "died" in after.details()
    assert load == (0, 0)  # nothing queued for an engine that will never run it
