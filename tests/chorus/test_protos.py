"""The wire contract: buf lint, and committed stubs match the protos."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chorus.rpc import protogen

ROOT = Path(__file__).resolve().parents[2]


def test_buf_lint_passes():
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    if not Path(buf).exists():
        pytest.fail("buf is not installed: `pip install -e .[dev]` installs buf-bin")
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_committed_stubs_are_fresh():
    assert protogen.stale_files() == []


def test_stale_stub_is_detected(tmp_path):
    out = tmp_path / "proto"
    protogen.generate(out)
    assert protogen.stale_files(out) == []
    stub = out / "tts" / "v1" / "codec_pb2.py"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    assert protogen.stale_files(out) == ["tts/v1/codec_pb2.py"]
