"""The pieces of access control on their own: the access policy every door asks, the
API keys file, the key and peer a call carries, the TLS files a service is given, and
the flags and configs that set them. The services using them are tested over real
TLS in test_security.py and, door by door, in test_doors.py."""

from __future__ import annotations

import asyncio
import os

import pytest

from certs import CertificateAuthority
from chorus.security import api_keys
from chorus.security.access import AccessPolicy, Code, Knock, Refusal, Share, presented_key
from chorus.security.api_keys import ApiKeys, parse_keys
from chorus.security.auth import peer_connection, peer_host
from chorus.security.tls import TlsFiles
from gateway.__main__ import build_config as gateway_config, parse_args as gateway_args
from services.codec_worker.__main__ import build_config as codec_config, parse_args as codec_args

SECRET = "s3cret-0123456789abcdef"


@pytest.fixture(scope="module")
def issued(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority()
    return ca.issue(root / "gateway", "chorus-gateway"), ca.issue(root / "codec", "chorus-codec-worker")


def test_a_key_is_found_by_its_secret_and_named_by_its_id(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# clients\n\nalice:{SECRET}\n  bob : {SECRET}-bob  \n")
    keys = ApiKeys(path)
    assert keys.key_ids == ("alice", "bob")
    assert keys.lookup(SECRET) == "alice"
    assert keys.lookup(f"{SECRET}-bob") == "bob"
    assert keys.lookup(SECRET[:-1]) is None
    assert keys.lookup("") is None


def test_a_lookup_compares_the_secret_with_every_key_in_constant_time(tmp_path, monkeypatch):
    """hmac.compare_digest on digests of equal length, against every key with no early
    exit, so the time a lookup takes tells nothing about which key, if any, matched."""
    path = tmp_path / "keys"
    path.write_text("".join(f"key{i}:{SECRET}-{i}\n" for i in range(5)))
    keys = ApiKeys(path)
    compared = []
    real = api_keys.hmac.compare_digest
    monkeypatch.setattr(api_keys.hmac, "compare_digest", lambda a, b: compared.append((len(a), len(b))) or real(a, b))
    assert keys.lookup(f"{SECRET}-0") == "key0"
    assert keys.lookup("a-guess-that-is-long-enough") is None
    assert compared == [(32, 32)] * 10


@pytest.mark.parametrize(
    "text, message",
    [
        (f"{SECRET}\n", "line 1: expected `<key id>:<secret>`"),
        ("alice:short\n", "the secret of alice must be at least 16"),
        (f"alice:{SECRET} more\n", "with no spaces"),
        (f"al ice:{SECRET}\n", "key id 'al ice' must be"),
        (f"alice:{SECRET}\nalice:{SECRET}x\n", "line 2: key id alice appears twice"),
        (f"alice:{SECRET}\nbob:{SECRET}\n", "line 2: the secret of bob is also another key's secret"),
    ],
)
def test_a_malformed_keys_file_names_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_keys(text, "keys")


def test_a_missing_keys_file_is_a_configuration_error(tmp_path):
    with pytest.raises(ValueError, match="API keys file .*missing: No such file"):
        ApiKeys(tmp_path / "missing")


def test_the_keys_file_is_reread_when_it_changes_and_kept_when_it_breaks(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"alice:{SECRET}\n")
    keys = ApiKeys(path)
    # A rewrite in place of the same size: the mtime tells.
    path.write_text(f"carol:{SECRET}\n"[: len(f"alice:{SECRET}\n")])
    os.utime(path, ns=(1, 1))
    assert keys.lookup(SECRET) == "carol"
    path.write_text("garbage\n")
    assert keys.lookup(SECRET) == "carol", "a broken file keeps the keys read before"
    path.unlink()
    assert keys.lookup(SECRET) == "carol", "so does a file that went away"
    path.write_text(f"dave:{SECRET}\n")
    assert keys.lookup(SECRET) == "dave"


@pytest.mark.parametrize(
    "metadata, key",
    [
        ((("authorization", f"Bearer {SECRET}"),), SECRET),
        ((("authorization", f"bearer  {SECRET} "),), SECRET),
        ((("x-api-key", SECRET),), SECRET),
        ((("authorization", f"Basic {SECRET}"),), None),
        ((("authorization", "Bearer "),), None),
        ((("x-api-key-bin", SECRET.encode()),), None),
        ((), None),
    ],
)
def test_the_key_comes_from_bearer_or_x_api_key(metadata, key):
    assert presented_key(metadata) == key


@pytest.mark.parametrize(
    "peer, host",
    [
        ("ipv4:10.0.0.7:41234", "10.0.0.7"),
        ("ipv6:%5B::1%5D:5000", "::1"),
        ("ipv6:[fd00::2]:5000", "fd00::2"),
        ("unix:/tmp/socket", "unix:/tmp/socket"),
    ],
)
def test_a_client_is_its_address_without_the_port(peer, host):
    assert peer_host(peer) == host


@pytest.mark.parametrize(
    "peer, connection",
    [
        ("ipv4:10.0.0.7:41234", "10.0.0.7:41234"),
        ("ipv6:%5B::1%5D:5000", "[::1]:5000"),
        ("unix:/tmp/socket", "unix:/tmp/socket"),
    ],
)
def test_a_connection_is_its_address_and_port(peer, connection):
    assert peer_connection(peer) == connection


# --- the access policy -------------------------------------------------------------


def knock(**fields) -> Knock:
    """A synthesis stream from 10.0.0.7 over one connection, with no certificate and no key."""
    return Knock(**{"host": "10.0.0.7", "connection": "10.0.0.7:41234", "identities": (), "secret": None,
                    "open": False, "holds_stream": True, "method": "/tts.v1.SynthesisService/Synthesize",
                    **fields})


def refusal(policy: AccessPolicy, call: Knock) -> tuple[Code, str | None]:
    with pytest.raises(Refusal) as refused:
        policy.admit(call)
    return refused.value.code, refused.value.reason


@pytest.fixture
def keys(tmp_path) -> ApiKeys:
    path = tmp_path / "keys"
    path.write_text(f"alice:{SECRET}\nbob:{SECRET}-bob\n")
    return ApiKeys(path)


def test_the_policy_checks_identity_then_key_then_drain_then_streams(keys):
    refused = []
    policy = AccessPolicy(allowed_clients=("partner",), api_keys=keys, max_streams_per_client=1,
                          on_refused=refused.append)
    partner = knock(identities=("partner",), secret=SECRET)
    assert refusal(policy, knock(identities=("stranger",), secret=SECRET)) == (Code.PERMISSION_DENIED, "not_allowed")
    assert refusal(policy, knock(identities=("partner",))) == (Code.UNAUTHENTICATED, "no_api_key")
    assert refusal(policy, knock(identities=("partner",), secret="x" * 20)) == (Code.UNAUTHENTICATED, "bad_api_key")
    held = policy.admit(partner)
    assert held.caller.client == "partner@10.0.0.7" and held.caller.key_id == "alice"
    assert held.caller.attributes == {"chorus.client": "partner@10.0.0.7", "chorus.api_key_id": "alice"}
    assert refusal(policy, partner) == (Code.RESOURCE_EXHAUSTED, "client_limit")
    policy.drain()
    assert refusal(policy, partner) == (Code.UNAVAILABLE, None), "draining comes before the limits"
    assert refused == ["not_allowed", "no_api_key", "bad_api_key", "client_limit"], "a drain is not the caller's fault"


def test_open_doors_need_no_key_or_identity_but_their_streams_count(keys):
    policy = AccessPolicy(allowed_clients=("partner",), api_keys=keys, max_streams_per_client=1)
    probe = knock(open=True, method="/grpc.health.v1.Health/Watch", identities=("stranger",))
    watching = policy.admit(probe)
    assert watching.caller.client == "stranger@10.0.0.7"
    assert refusal(policy, probe) == (Code.RESOURCE_EXHAUSTED, "client_limit")
    assert policy.in_flight == 0, "a probe is not work: it never holds a drain open"
    policy.drain()
    watching.release()
    assert policy.admit(probe).caller.key_id is None, "probes are answered while draining"


def test_a_client_is_its_identity_at_its_address_else_its_connection_or_address():
    by_connection = AccessPolicy(max_streams_per_client=1)
    by_address = AccessPolicy(max_streams_per_client=1, share=Share.ADDRESS)
    same_host = knock(connection="10.0.0.7:50000")
    by_connection.admit(knock())
    assert by_connection.admit(same_host).caller.client == "10.0.0.7:50000", "another process on the host"
    by_address.admit(knock())
    assert refusal(by_address, same_host) == (Code.RESOURCE_EXHAUSTED, "client_limit")
    # A certificate identity cannot be borrowed: the share is the identity's at its address, whatever the share.
    for policy in (AccessPolicy(max_streams_per_client=1), AccessPolicy(max_streams_per_client=1, share=Share.ADDRESS)):
        policy.admit(knock(identities=("chorus-token-server",)))
        assert policy.admit(knock(connection="10.0.0.7:50000")).caller.client != "chorus-token-server@10.0.0.7"
        assert refusal(policy, knock(identities=("chorus-token-server",), connection="10.0.0.7:50001")) == (
            Code.RESOURCE_EXHAUSTED, "client_limit")


def test_streams_per_key_are_the_keys_wherever_it_calls_from(keys):
    policy = AccessPolicy(api_keys=keys, max_streams_per_key=1)
    policy.admit(knock(secret=SECRET))
    assert refusal(policy, knock(secret=SECRET, host="10.0.0.8", connection="10.0.0.8:1")) == (
        Code.RESOURCE_EXHAUSTED, "key_limit")
    assert policy.admit(knock(secret=f"{SECRET}-bob")).caller.key_id == "bob"
    unary = knock(secret=SECRET, holds_stream=False, method="/tts.v1.SynthesisService/ListVoices")
    assert policy.admit(unary).caller.key_id == "alice", "only streams count against the stream limits"


def test_the_drain_waits_for_work_in_flight_and_release_is_idempotent():
    async def scenario():
        policy = AccessPolicy()
        first, second = policy.admit(knock()), policy.admit(knock(holds_stream=False))
        policy.drain()
        waiting = asyncio.ensure_future(policy.wait_idle())
        first.release()
        first.release()
        await asyncio.sleep(0)
        still_waiting = not waiting.done()
        second.release()
        await asyncio.wait_for(waiting, 10)
        return still_waiting, policy.in_flight

    assert asyncio.run(scenario()) == (True, 0)


def test_the_message_limit_is_one_number_for_every_door():
    policy = AccessPolicy(max_request_bytes=100)
    policy.check_size(100)
    with pytest.raises(Refusal, match="reads at most 100 bytes") as refused:
        policy.check_size(101)
    assert refused.value.code == Code.RESOURCE_EXHAUSTED


def test_tls_needs_all_three_files_or_none(issued):
    gateway, _ = issued
    assert TlsFiles.from_flags(None, None, None) is None
    assert TlsFiles.from_flags(str(gateway.cert), str(gateway.key), str(gateway.ca)).cert == gateway.cert
    with pytest.raises(ValueError, match="missing --tls-ca"):
        TlsFiles.from_flags(str(gateway.cert), str(gateway.key), None)


def test_tls_files_that_cannot_work_are_named(issued, tmp_path):
    gateway, codec = issued
    with pytest.raises(ValueError, match="do not make a usable pair.*KEY_VALUES_MISMATCH"):
        TlsFiles(gateway.cert, codec.key, gateway.ca)
    with pytest.raises(ValueError, match="--tls-ca .* is not a usable CA bundle"):
        TlsFiles(gateway.cert, gateway.key, gateway.key)
    (tmp_path / "text").write_text("not a certificate")
    with pytest.raises(ValueError, match="is not a PEM file"):
        TlsFiles(tmp_path / "text", gateway.key, gateway.ca)
    with pytest.raises(ValueError, match="--tls-key .*nope: No such file"):
        TlsFiles(gateway.cert, tmp_path / "nope", gateway.ca)


def test_flags_and_environment_set_tls_keys_and_limits(issued, tmp_path, monkeypatch):
    gateway, codec = issued
    keys = tmp_path / "keys"
    keys.write_text(f"alice:{SECRET}\n")
    monkeypatch.setenv("CHORUS_TLS_CERT", str(gateway.cert))
    monkeypatch.setenv("CHORUS_TLS_KEY", str(gateway.key))
    monkeypatch.setenv("CHORUS_TLS_CA", str(gateway.ca))
    monkeypatch.setenv("CHORUS_API_KEYS_FILE", str(keys))
    config = gateway_config(gateway_args(["--token-servers", "ts:50052", "--max-streams-per-key", "5"]))
    assert config.tls.key == gateway.key and config.api_keys_file == keys
    assert (config.max_streams_per_client, config.max_streams_per_key, config.allowed_clients) == (64, 5, ())

    monkeypatch.setenv("CHORUS_TLS_CERT", str(codec.cert))
    monkeypatch.setenv("CHORUS_TLS_KEY", str(codec.key))
    monkeypatch.setenv("CHORUS_IDLE_TIMEOUT", "12.5")
    worker = codec_config(codec_args(["--model-dir", str(tmp_path), "--max-streams", "10"]))
    assert worker.allowed_clients == ("chorus-token-server",)
    assert (worker.max_streams_per_client, worker.start_timeout_s, worker.idle_timeout_s) == (5, 10.0, 12.5)
    worker = codec_config(codec_args(["--model-dir", str(tmp_path), "--allowed-clients", "a, b"]))
    assert worker.allowed_clients == ("a", "b")


def test_plaintext_is_the_default(tmp_path, monkeypatch):
    for name in ("CHORUS_TLS_CERT", "CHORUS_TLS_KEY", "CHORUS_TLS_CA", "CHORUS_API_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    config = gateway_config(gateway_args(["--token-servers", "ts:50052"]))
    assert config.tls is None and config.api_keys_file is None
    assert codec_config(codec_args(["--model-dir", str(tmp_path)])).tls is None


def test_bad_limit_values_are_refused_by_name(monkeypatch, capsys):
    monkeypatch.setenv("CHORUS_IDLE_TIMEOUT", "soon")
    with pytest.raises(SystemExit):
        codec_args(["--model-dir", "x"])
    assert "--idle-timeout: invalid float value: 'soon'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="allowed_clients needs TLS"):
        gateway_config(gateway_args(["--token-servers", "ts:1", "--allowed-clients", "someone"]))
    with pytest.raises(ValueError, match="max_streams_per_key must be >= 0"):
        gateway_config(gateway_args(["--token-servers", "ts:1", "--max-streams-per-key", "-1"]))
