"""The llama.cpp wheel cache and setup's smoke check, without building anything.

The cache key must change with the instruction sets a build may use and with its
flags, or a wheel built on one CPU is handed to another and dies there. And a wheel
whose smoke check dies by a signal must be set aside for good, with setup moving on
to the portable build: the death here is real (a child that kills itself with
SIGILL), only the build is fake.
"""

from __future__ import annotations

import hashlib
import base64
import json
import signal
import sys
import zipfile
from pathlib import Path

import pytest

from tools.llama_wheel import cache as wheel_cache
from tools.llama_wheel import cpu, flavours
from tools.llama_wheel.provision import ProvisionError, provision
from tools.llama_wheel.smoke import describe_death, run_smoke

AMX = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")


def flavour(*compile_flags: str, cmake: tuple[str, ...] = ("-DGGML_NATIVE=ON",), name: str = "native"):
    return flavours.Flavour(name, cmake, compile_flags)


def test_the_key_changes_with_the_cpu_the_build_targets():
    # -march=CPU stands in for -march=native on that CPU: the compiler's macros differ.
    keys = {march: flavour(f"-march={march}", *AMX).key() for march in ("haswell", "icelake-server", "znver3")}
    assert len(set(keys.values())) == 3
    assert flavour("-march=haswell", *AMX).key() == keys["haswell"]  # and is stable
    assert "AVX512F" in flavour("-march=icelake-server").instruction_sets()
    assert "AVX512F" not in flavour("-march=haswell").instruction_sets()


def test_the_key_changes_with_amx_and_with_the_build_flags():
    with_amx = flavour("-march=sapphirerapids")
    without = flavour("-march=sapphirerapids", *AMX)
    assert "AMX_TILE" in with_amx.instruction_sets() and "AMX_TILE" not in without.instruction_sets()
    assert with_amx.key() != without.key()
    assert flavour("-march=haswell", cmake=("-DGGML_NATIVE=ON", "-DGGML_OPENMP=OFF")).key() != \
        flavour("-march=haswell").key()


def test_the_native_flavour_never_compiles_amx_and_portable_follows_the_cpu():
    assert "AMX_TILE" not in flavours.native().instruction_sets()
    assert "-mno-amx-tile" in flavours.native().cmake_env
    with_avx2 = flavours.portable(frozenset({"avx", "avx2", "fma", "f16c", "bmi2", "amx_tile"}))
    without = flavours.portable(frozenset({"sse4_2"}))
    assert "-DGGML_AVX2=ON" in with_avx2.cmake_args and "-DGGML_AVX2=OFF" in without.cmake_args
    assert "AVX2" in with_avx2.instruction_sets() and "AVX2" not in without.instruction_sets()
    assert with_avx2.key() != without.key()


def fake_wheel(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llama_cpp/__init__.py", "")
        zf.writestr("llama_cpp_python-0.3.36.dist-info/RECORD",
                    "llama_cpp/__init__.py,,\nllama_cpp_python-0.3.36.dist-info/RECORD,,\n")
    return wheel


def test_the_build_record_travels_inside_the_wheel_and_its_record(tmp_path):
    entry = wheel_cache.WheelCache(tmp_path / "cache").store("k", fake_wheel(tmp_path / "built"), {"flavour": "x"})
    with zipfile.ZipFile(entry.wheel) as zf:
        data = zf.read(wheel_cache.RECORD_IN_WHEEL)
        record_lines = zf.read("llama_cpp_python-0.3.36.dist-info/RECORD").decode().splitlines()
    assert json.loads(data) == {"flavour": "x"} == entry.record
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    assert f"{wheel_cache.RECORD_IN_WHEEL},sha256={digest},{len(data)}" in record_lines


SIGILL_CHILD = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
GOOD_CHILD = [sys.executable, "-c",
              'print(\'{"prompt_tokens": 3, "prompt_s": 0.01, "step_s": 0.001, "finite_logits": true}\')']


class FakeMachine:
    """Builds write a stub wheel, install remembers which flavour is in, and the smoke
    check is a real child process: one that dies of SIGILL for the flavours in `crashing`."""

    def __init__(self, tmp_path: Path, crashing: set[str]) -> None:
        self.tmp, self.crashing = tmp_path, crashing
        self.built: list[str] = []
        self.smoked: list[str] = []
        self.installed: str | None = None
        self.said: list[str] = []

    def build(self, fl: flavours.Flavour) -> Path:
        self.built.append(fl.name)
        return fake_wheel(self.tmp / f"build-{len(self.built)}")

    def install(self, entry: wheel_cache.Entry) -> None:
        assert entry.wheel is not None and entry.wheel.is_file()
        self.installed = entry.record["flavour"]

    def smoke(self):
        self.smoked.append(self.installed)
        return run_smoke(SIGILL_CHILD if self.installed in self.crashing else GOOD_CHILD)

    def provision(self, cache: wheel_cache.WheelCache):
        chain = [flavours.native(), flavours.portable()]
        return provision(chain, cache, self.build, self.install, self.smoke, say=self.said.append)


def test_setup_sets_aside_a_wheel_whose_smoke_check_dies_and_falls_back(tmp_path):
    cache = wheel_cache.WheelCache(tmp_path / "cache")
    machine = FakeMachine(tmp_path, crashing={"native"})
    done = machine.provision(cache)
    assert done.flavour.name == "portable" and done.smoke.ok
    assert machine.built == ["native", "portable"] and machine.smoked == ["native", "portable"]
    native = cache.entry(flavours.native().key())
    assert native.wheel is None, "the crashing wheel must not stay in the cache"
    assert native.rejection["signal"] == "SIGILL"
    paragraph = next(line for line in machine.said if "died of" in line)
    assert "SIGILL (illegal instruction" in paragraph and "set aside" in paragraph and "portable" in paragraph
    assert cpu.cpu_model() in paragraph

    # The next setup never hands out, nor even tries, the rejected wheel.
    again = FakeMachine(tmp_path, crashing={"native"})
    done = again.provision(cache)
    assert done.flavour.name == "portable" and not done.built
    assert again.built == [] and again.smoked == ["portable"]
    assert "skipping the native" in again.said[0] and "SIGILL" in again.said[0]


def test_setup_stops_with_the_reason_when_the_portable_wheel_dies_too(tmp_path):
    machine = FakeMachine(tmp_path, crashing={"native", "portable"})
    with pytest.raises(ProvisionError, match="no safer build") as err:
        machine.provision(wheel_cache.WheelCache(tmp_path / "cache"))
    assert "SIGILL" in str(err.value) and "chorus doctor" in str(err.value)


def test_a_good_wheel_is_built_once_and_reused(tmp_path):
    cache = wheel_cache.WheelCache(tmp_path / "cache")
    first = FakeMachine(tmp_path, crashing=set())
    assert first.provision(cache).flavour.name == "native" and first.built == ["native"]
    second = FakeMachine(tmp_path, crashing=set())
    assert second.provision(cache).built is False and second.built == [] and second.smoked == ["native"]


def test_the_crash_paragraph_names_advertised_amx_and_flags_the_cpu_lacks(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "amx_tile", "amx_int8"}))
    record = {"flavour": "native", "llama_cpp_python": "0.3.36", "cpu_model": "Some Other CPU",
              "instruction_sets": ["AVX2", "AVX512F", "AVX512VNNI"]}
    text = describe_death("token server 0", signal.SIGILL, record)
    assert "token server 0 died of SIGILL" in text and "libggml-cpu.so" in text
    assert "amx_int8, amx_tile" in text
    assert "with avx2, avx512f, avx512_vnni;" in text
    assert "uses avx512_vnni, which this CPU does not advertise" in text
