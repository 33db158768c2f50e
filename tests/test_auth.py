"""The pieces of access control on their own: the API keys file, the key and peer a
call carries, the TLS files a service is given, and the flags and configs that set them.
The services using them are tested over real TLS in test_security.py."""

from __future__ import annotations

import os

import pytest

from certs import CertificateAuthority
from chorus.api_keys import ApiKeys, parse_keys
from chorus.auth import peer_host, presented_key
from chorus.tls import TlsFiles
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
