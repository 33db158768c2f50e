"""TLS, mutual TLS and API keys, with the three services as separate processes.

The test is its own certificate authority (tests/support/certs.py): each tier gets a
certificate naming its tier, as cert-manager would issue it, and the API keys file is
laid out the way the kubelet mounts a Secret (a `..data` symlink swapped on update),
so that rotation is tested the way it happens in a cluster.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from certs import CertificateAuthority, TlsFolder
from chorus.proto.tts.v1 import codec_pb2, codec_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc, token_server_pb2, token_server_pb2_grpc
from chorus.rpc.serving import GRPC_OPTIONS
from chorus.security.tls import TlsFiles
from chorus.telemetry.tiers import CODEC_WORKER, GATEWAY, TOKEN_SERVER
from gateway.config import GatewayConfig
from gateway.server import start_server as start_gateway
from otlp_receiver import running_receiver
from tools.client import GatewayAccess, say
from tools.supervisor import Stack

pytestmark = pytest.mark.slow

ALICE = "alice-0123456789abcdef0123456789"
BOB = "bob-fedcba9876543210fedcba987654"
OLD = "old-00000000000000000000000000000"
NEW = "new-11111111111111111111111111111"
KEY_LIMIT, CLIENT_LIMIT = 2, 3


def budget(frames: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=7 * frames, seed=7)


class SecretVolume:
    """A folder laid out like a Kubernetes Secret volume: `keys` -> `..data/keys`,
    `..data` -> a timestamped folder; an update writes a new folder and swaps `..data`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._version = 0
        (self.root / "keys").symlink_to("..data/keys")

    @property
    def path(self) -> Path:
        return self.root / "keys"

    def write(self, text: str) -> None:
        self._version += 1
        folder = self.root / f"..v{self._version}"
        folder.mkdir()
        (folder / "keys").write_text(text)
        link = self.root / "..data_tmp"
        link.symlink_to(folder.name)
        os.replace(link, self.root / "..data")


def keys_text(*entries: tuple[str, str]) -> str:
    return "# key id:secret\n" + "".join(f"{key_id}:{secret}\n" for key_id, secret in entries)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, TlsFolder]:
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority()
    issued = {tier: ca.issue(root / tier, tier) for tier in (GATEWAY, TOKEN_SERVER, CODEC_WORKER)}
    # The right name from the wrong authority.
    issued["rogue"] = CertificateAuthority("rogue-ca").issue(root / "rogue", GATEWAY)
    return issued


@pytest.fixture(scope="module")
def otlp():
    with running_receiver() as servicer:
        yield servicer


@pytest.fixture(scope="module")
def api_keys(tmp_path_factory) -> SecretVolume:
    volume = SecretVolume(tmp_path_factory.mktemp("api-keys"))
    volume.write(keys_text(("alice", ALICE), ("bob", BOB), ("rotating", OLD)))
    return volume


def secured_stack(models_root: Path, work_dir: Path, pki: dict[str, TlsFolder], otlp, gateway_flags: list[str]):
    """The three services as processes, each with its tier's certificate (TLS and
    mutual TLS), the gateway with `gateway_flags` too, all tracing to `otlp`."""
    return Stack(
        calibrate=False,  # measures no capacity: start without calibrating
        models_dir=models_root,
        slots=2,
        work_dir=work_dir,
        extra_args={
            "codec_worker": pki[CODEC_WORKER].flags(),
            "token_server": pki[TOKEN_SERVER].flags(),
            "gateway": pki[GATEWAY].flags() + gateway_flags,
        },
        env={"CHORUS_OTLP_ENDPOINT": otlp.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"},
    )


@pytest.fixture(scope="module")
def stack(demo_models, tmp_path_factory, pki, api_keys, otlp):
    gateway_flags = [
        "--api-keys-file", str(api_keys.path),
        "--max-streams-per-key", str(KEY_LIMIT),
        "--max-streams-per-client", str(CLIENT_LIMIT),
        "--host", "localhost",  # 127.0.0.1 and ::1: two client addresses on one machine
    ]
    with secured_stack(demo_models.root, tmp_path_factory.mktemp("secure-stack"), pki, otlp, gateway_flags) as running:
        yield running


def gateway_channel(stack, pki, address: str | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki[GATEWAY].ca.read_bytes())
    return grpc.secure_channel(address or stack.gateway_address, credentials, options=GRPC_OPTIONS)


def mtls_channel(address: str, client: TlsFolder, server_tier: str) -> grpc.Channel:
    """A channel to an internal service, presenting `client`'s certificate."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=client.ca.read_bytes(), private_key=client.key.read_bytes(),
        certificate_chain=client.cert.read_bytes(),
    )
    return grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", server_tier)])


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_a_client_with_the_ca_and_a_key_is_served_end_to_end(stack, pki, otlp, tmp_path):
    out = tmp_path / "hello.wav"
    with open(out, "wb") as f:
        result = say(stack.gateway_address, "Secured speech.", f, sampling=budget(8), timeout=120,
                     access=GatewayAccess(tls_ca=str(pki[GATEWAY].ca), api_key=ALICE))
    assert result.samples > 0 and result.summary.frames > 0
    # x-api-key works too.
    with gateway_channel(stack, pki) as channel:
        voices = gateway_pb2_grpc.SynthesisServiceStub(channel).ListVoices(
            gateway_pb2.ListVoicesRequest(), metadata=(("x-api-key", BOB),), timeout=10
        )
    assert voices.voices
    # The key's id, never its secret, goes into the gateway's trace and log.
    attributes = span_attributes(otlp, "/tts.v1.SynthesisService/Synthesize", result.summary.trace_id)
    assert attributes.get("chorus.api_key_id") == "alice"
    log = stack.gateway_process.log_path.read_text()
    assert "with key alice" in log
    assert ALICE not in log and BOB not in log


def span_attributes(otlp, name: str, trace_id: str) -> dict[str, str]:
    """The string attributes of the span `name` of trace `trace_id`, once exported
    (empty if it never is)."""
    for _ in range(100):
        for export in list(otlp.requests):
            for resource_spans in export.resource_spans:
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        if span.name == name and span.trace_id.hex() == trace_id:
                            return {a.key: a.value.string_value for a in span.attributes}
        time.sleep(0.1)
    return {}


def test_without_a_valid_key_every_call_but_probes_is_unauthenticated(stack, pki):
    request = gateway_pb2.SynthesizeRequest(text="No key.", sampling=budget(4))
    with gateway_channel(stack, pki) as channel:
        stub = gateway_pb2_grpc.SynthesisServiceStub(channel)
        missing = rpc_error(lambda: list(stub.Synthesize(request, timeout=30)))
        wrong = rpc_error(lambda: list(stub.Synthesize(request, metadata=bearer(ALICE[:-1] + "X"), timeout=30)))
        basic = rpc_error(lambda: stub.GetLimits(gateway_pb2.GetLimitsRequest(),
                                                 metadata=(("authorization", f"Basic {ALICE}"),), timeout=10))
        voices = rpc_error(lambda: stub.ListVoices(gateway_pb2.ListVoicesRequest(), timeout=10))
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        listed = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        ))
    for err in (missing, basic, voices):
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "needs an API key: send `authorization: Bearer <key>`" in err.details()
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "API key is not valid" in wrong.details()
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "tts.v1.SynthesisService" in {s.name for s in listed.list_services_response.service}


def test_a_rotated_key_file_takes_effect_without_a_restart(stack, pki, api_keys):
    pid = stack.gateway_process.popen.pid

    def voices(secret: str):
        with gateway_channel(stack, pki) as channel:
            return gateway_pb2_grpc.SynthesisServiceStub(channel).ListVoices(
                gateway_pb2.ListVoicesRequest(), metadata=bearer(secret), timeout=10
            )

    assert voices(OLD).voices
    assert rpc_error(lambda: voices(NEW)).code() == grpc.StatusCode.UNAUTHENTICATED
    api_keys.write(keys_text(("alice", ALICE), ("bob", BOB), ("rotating", NEW)))
    assert voices(NEW).voices
    assert rpc_error(lambda: voices(OLD)).code() == grpc.StatusCode.UNAUTHENTICATED
    # A broken update keeps the keys read before instead of locking everyone out.
    api_keys.write("this line is not a key\n")
    assert voices(NEW).voices
    assert "cannot be used" in stack.gateway_process.log_tail(200)
    api_keys.write(keys_text(("alice", ALICE), ("bob", BOB), ("rotating", NEW)))
    assert stack.gateway_process.popen.pid == pid and stack.gateway_process.alive


@pytest.mark.parametrize("tier", [GATEWAY, TOKEN_SERVER, CODEC_WORKER])
def test_plaintext_clients_are_refused(stack, tier):
    address = _address(stack, tier)
    with grpc.insecure_channel(address) as channel:
        err = rpc_error(lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def _address(stack, tier: str) -> str:
    return {
        GATEWAY: stack.gateway_address,
        TOKEN_SERVER: stack.token_server_processes[0].address,
        CODEC_WORKER: stack.codec_worker_processes[0].address,
    }[tier]


def test_the_token_server_takes_only_gateways(stack, pki):
    address = _address(stack, TOKEN_SERVER)

    def status(client: TlsFolder):
        with mtls_channel(address, client, TOKEN_SERVER) as channel:
            return token_server_pb2_grpc.TokenServiceStub(channel).GetStatus(
                token_server_pb2.GetStatusRequest(), timeout=10
            )

    def generate(client: TlsFolder):
        request = token_server_pb2.GenerateRequest(text="Straight to the backbone.", codes_only=True)
        with mtls_channel(address, client, TOKEN_SERVER) as channel:
            return list(token_server_pb2_grpc.TokenServiceStub(channel).Generate(request, timeout=30))

    assert status(pki[GATEWAY]).slots_total == 2
    for wrong_tier in (pki[CODEC_WORKER], pki[TOKEN_SERVER]):
        for call in (status, generate):
            err = rpc_error(lambda: call(wrong_tier))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "takes calls only from chorus-gateway" in err.details()
    # A certificate from another authority, even one naming the right tier, does not connect.
    assert rpc_error(lambda: status(pki["rogue"])).code() == grpc.StatusCode.UNAVAILABLE
    # Nor does a TLS client without a certificate.
    credentials = grpc.ssl_channel_credentials(root_certificates=pki[GATEWAY].ca.read_bytes())
    with grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", TOKEN_SERVER)]) as ch:
        err = rpc_error(lambda: token_server_pb2_grpc.TokenServiceStub(ch).GetStatus(
            token_server_pb2.GetStatusRequest(), timeout=10))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    # Probes: any certificate of the cluster's CA may ask for health.
    with mtls_channel(address, pki[CODEC_WORKER], TOKEN_SERVER) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_the_codec_worker_takes_only_token_servers(stack, pki):
    address = _address(stack, CODEC_WORKER)

    def load(client: TlsFolder):
        with mtls_channel(address, client, CODEC_WORKER) as channel:
            return codec_pb2_grpc.CodecServiceStub(channel).GetLoad(codec_pb2.GetLoadRequest(), timeout=10)

    def decode(client: TlsFolder):
        requests = [codec_pb2.DecodeRequest(start=codec_pb2.DecodeStart(request_id="direct"))]
        with mtls_channel(address, client, CODEC_WORKER) as channel:
            return list(codec_pb2_grpc.CodecServiceStub(channel).Decode(iter(requests), timeout=30))

    assert load(pki[TOKEN_SERVER]).max_streams > 0
    assert decode(pki[TOKEN_SERVER])[-1].final
    # A gateway certificate cannot skip the token server.
    for call in (load, decode):
        err = rpc_error(lambda: call(pki[GATEWAY]))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "takes calls only from chorus-token-server" in err.details()
        assert "names chorus-gateway" in err.details()


class HeldStream:
    """A StreamingSynthesize call that has been admitted (its first audio came) and
    stays open, waiting for more text, until released."""

    def __init__(self, stub, secret: str) -> None:
        self._release = threading.Event()
        self.call = stub.StreamingSynthesize(self._messages(), metadata=bearer(secret), timeout=120)

    def _messages(self):
        yield gateway_pb2.StreamingSynthesizeRequest(
            config=gateway_pb2.StreamingSynthesizeConfig(sampling=budget(3))
        )
        yield gateway_pb2.StreamingSynthesizeRequest(text="Held.")
        yield gateway_pb2.StreamingSynthesizeRequest(flush=gateway_pb2.Flush())
        self._release.wait(120)

    def admitted(self) -> HeldStream:
        next(self.call)
        return self

    def release(self) -> None:
        self._release.set()
        self.call.cancel()


def test_streams_per_key_and_per_client_are_limited(stack, pki):
    ipv4 = gateway_channel(stack, pki)
    ipv6 = gateway_channel(stack, pki, f"[::1]:{stack.gateway_address.rpartition(':')[2]}")
    held: list[HeldStream] = []
    try:
        v4 = gateway_pb2_grpc.SynthesisServiceStub(ipv4)
        v6 = gateway_pb2_grpc.SynthesisServiceStub(ipv6)
        def hold(stub, secret: str) -> HeldStream:
            held.append(HeldStream(stub, secret))
            return held[-1].admitted()

        for _ in range(KEY_LIMIT):
            hold(v4, ALICE)
        over_key = rpc_error(lambda: hold(v4, ALICE))
        # Another key from the same address is still served, up to the address's limit.
        hold(v4, BOB)
        over_client = rpc_error(lambda: hold(v4, BOB))
        # The same key from another address is.
        hold(v6, BOB)
        for stream in held[:KEY_LIMIT]:
            stream.release()
        hold(v4, ALICE)  # a released stream frees its place
    finally:
        for stream in held:
            stream.release()
        ipv4.close()
        ipv6.close()
    assert over_key.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"API key alice already holds {KEY_LIMIT} streams" in over_key.details()
    assert over_client.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"client 127.0.0.1 already holds {CLIENT_LIMIT} streams" in over_client.details()


def test_oversized_messages_are_refused_before_they_are_read(stack, pki):
    request = gateway_pb2.SynthesizeRequest(text="a" * (2 * 1024 * 1024))
    with gateway_channel(stack, pki) as channel:
        err = rpc_error(lambda: list(gateway_pb2_grpc.SynthesisServiceStub(channel).Synthesize(
            request, metadata=bearer(ALICE), timeout=30)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The gateway still serves.
    with gateway_channel(stack, pki) as channel:
        assert gateway_pb2_grpc.SynthesisServiceStub(channel).GetLimits(
            gateway_pb2.GetLimitsRequest(), metadata=bearer(ALICE), timeout=10
        ).max_text_chars


@pytest.mark.parametrize("tier", [TOKEN_SERVER, CODEC_WORKER])
def test_a_pod_probes_its_own_mtls_port_with_its_own_certificate(stack, pki, tier):
    port = _address(stack, tier).rpartition(":")[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_TLS_")}

    def probe(extra_env):
        return subprocess.run([sys.executable, "-m", "chorus.rpc.probe", "--tier", tier, "--port", port],
                              env={**env, **extra_env}, capture_output=True, text=True, timeout=60)

    own = pki[tier]
    secured = probe({"CHORUS_TLS_CERT": str(own.cert), "CHORUS_TLS_KEY": str(own.key), "CHORUS_TLS_CA": str(own.ca)})
    plaintext = probe({})
    assert (secured.returncode, secured.stdout.strip()) == (0, f"{tier} at 127.0.0.1:{port}: SERVING")
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr


def test_health_watches_need_no_key_but_count_against_the_client_limit(stack, pki):
    """Open to probes is not open to floods: a client cannot hold endless Watch streams."""
    port = stack.gateway_address.rpartition(":")[2]
    with gateway_channel(stack, pki, f"[::1]:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(CLIENT_LIMIT)]
        try:
            statuses = [next(watch).status for watch in watches]
            over = rpc_error(lambda: next(health.Watch(health_pb2.HealthCheckRequest(), timeout=60)))
        finally:
            for watch in watches:
                watch.cancel()
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * CLIENT_LIMIT
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"client ::1 already holds {CLIENT_LIMIT} streams" in over.details()


def test_chorus_say_and_voices_reach_a_secured_gateway(stack, pki, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
    base = [sys.executable, "-m", "tools.cli"]
    where = ["--gateway", stack.gateway_address, "--tls-ca", str(pki[GATEWAY].ca)]

    def run(args, **extra_env):
        return subprocess.run(base + args, env={**env, **extra_env}, capture_output=True, text=True, timeout=300)

    out = tmp_path / "cli.wav"
    spoken = run(["say", "Hi.", "-o", str(out), *where], CHORUS_API_KEY=BOB)
    listed = run(["voices", *where], CHORUS_API_KEY=BOB)
    keyless = run(["voices", *where])
    plaintext = run(["voices", "--gateway", stack.gateway_address], CHORUS_API_KEY=BOB)
    assert spoken.returncode == 0, spoken.stderr
    assert out.stat().st_size > 44
    assert listed.returncode == 0 and "tara" in listed.stdout
    assert keyless.returncode == 1
    assert "UNAUTHENTICATED" in keyless.stderr and "CHORUS_API_KEY" in keyless.stderr
    assert plaintext.returncode == 1 and "--tls-ca" in plaintext.stderr


def test_a_gateway_can_require_client_certificates_too(pki):
    """--allowed-clients on the gateway: only clients whose certificate names one get in."""
    ca_pem = pki[GATEWAY].ca.read_bytes()
    config = GatewayConfig(
        token_servers=("127.0.0.1:1",),  # none needed: ListVoices answers from config
        tls=TlsFiles(pki[GATEWAY].cert, pki[GATEWAY].key, pki[GATEWAY].ca),
        allowed_clients=(TOKEN_SERVER,),  # any tier name will do as "a partner's" identity
    )

    async def run():
        running = await start_gateway(config, port=0)
        try:
            results = {}
            for name, client in (("allowed", pki[TOKEN_SERVER]), ("other", pki[CODEC_WORKER]), ("none", None)):
                if client is None:
                    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
                else:
                    credentials = grpc.ssl_channel_credentials(
                        root_certificates=ca_pem, private_key=client.key.read_bytes(),
                        certificate_chain=client.cert.read_bytes())
                async with grpc.aio.secure_channel(running.address, credentials) as channel:
                    try:
                        reply = await gateway_pb2_grpc.SynthesisServiceStub(channel).ListVoices(
                            gateway_pb2.ListVoicesRequest(), timeout=10)
                        results[name] = len(reply.voices)
                    except grpc.aio.AioRpcError as err:
                        results[name] = err.code()
            return results
        finally:
            await running.stop(None)

    results = asyncio.run(run())
    assert results["allowed"] > 0
    assert results["other"] == grpc.StatusCode.PERMISSION_DENIED
    assert results["none"] == grpc.StatusCode.UNAVAILABLE
