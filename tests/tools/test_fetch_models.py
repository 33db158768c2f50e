"""tools.fetch_models (the chart's models Job and the pods' wait) against a real
HTTP server on 127.0.0.1: files land whole where the services read them, checksums
are enforced, a second run keeps what is there, and --wait returns once all is."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from tools import fetch_models

FILES = {"backbone.gguf": b"GGUF" + bytes(range(256)) * 64, "config.json": b'{"sampling_rate": 24000}',
         "pytorch_model.bin": b"\x80\x02weights" * 1000}


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[tuple[str, str]] = []

    def do_GET(self):
        type(self).requests.append((self.path, self.headers.get("Authorization", "")))
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    for name, data in FILES.items():
        (root / name).write_bytes(data)
    _Handler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(5)


def _argv(base: str, out: Path, **sha) -> list[str]:
    argv = ["--dir", str(out), "--backbone", f"{base}/backbone.gguf", "--snac-config", f"{base}/config.json",
            "--snac-weights", f"{base}/pytorch_model.bin"]
    for flag, value in sha.items():
        argv += [f"--{flag.replace('_', '-')}", value]
    return argv


def test_fetches_every_file_where_the_services_read_them_and_keeps_them(served, tmp_path, monkeypatch):
    out = tmp_path / "models"
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    sha = hashlib.sha256(FILES["backbone.gguf"]).hexdigest()
    assert fetch_models.main(_argv(served, out, backbone_sha256=sha)) == 0
    assert (out / "backbone.gguf").read_bytes() == FILES["backbone.gguf"]
    assert (out / "snac" / "config.json").read_bytes() == FILES["config.json"]
    assert (out / "snac" / "pytorch_model.bin").read_bytes() == FILES["pytorch_model.bin"]
    assert not list(out.rglob(".*partial"))
    assert {auth for _, auth in _Handler.requests} == {"Bearer secret-token"}

    # Again: the backbone's checksum matches and the others exist, so nothing is fetched.
    _Handler.requests = []
    assert fetch_models.main(_argv(served, out, backbone_sha256=sha)) == 0
    assert _Handler.requests == []


def test_a_wrong_checksum_fails_and_leaves_no_file(served, tmp_path, capsys):
    out = tmp_path / "models"
    assert fetch_models.main(_argv(served, out, snac_config_sha256="0" * 64)) == 1
    assert "sha256" in capsys.readouterr().err
    assert not (out / "snac" / "config.json").exists()
    assert not list(out.rglob(".*partial"))


def test_a_missing_file_fails_with_its_url(served, tmp_path, capsys):
    argv = _argv(served, tmp_path / "models")
    argv[argv.index("--backbone") + 1] = f"{served}/nope.gguf"
    assert fetch_models.main(argv) == 1
    assert "nope.gguf" in capsys.readouterr().err


def test_wait_returns_once_every_file_is_there(tmp_path):
    files = fetch_models.expected_files(tmp_path, "backbone.gguf", "snac")
    polls = []

    def sleep_and_write(_seconds):
        # Each poll, one more file arrives (what the Job's renames look like from a pod).
        missing = [f for f in files if not f.exists()]
        polls.append(len(missing))
        missing[0].parent.mkdir(parents=True, exist_ok=True)
        missing[0].write_bytes(b"x")

    fetch_models.wait_for(files, poll_s=0, log=lambda message: None, sleep=sleep_and_write)
    assert polls == [3, 2, 1]
    assert all(f.exists() for f in files)
    assert fetch_models.main(["--dir", str(tmp_path), "--wait"]) == 0
