"""`chorus doctor` reports what a bug report needs and survives what it finds.

Both checks run for real on the demo models (a one-step llama.cpp decode, a one-frame
SNAC decode) in child processes; without models it says so, builds nothing and exits
1; and a check whose child dies by a signal is a line of the report, not the end of
doctor. Times are only checked to be positive: the machine is shared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tools import doctor

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("system", "cpu", "cores", "llama_cpp", "torch", "gpu", "models", "checks")


def chorus(*args: str, python_code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tools.cli", *args] if python_code is None else [
        sys.executable, "-c", python_code, *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_doctor_reports_every_section_and_both_checks_pass(demo_models):
    done = chorus("doctor", "--models", str(demo_models.root), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    for section in SECTIONS:
        assert section in report, section
    assert isinstance(report["cpu"]["flags"], list)
    assert report["cores"]["affinity"] >= 1
    assert report["llama_cpp"]["system_info"]
    assert report["llama_cpp"]["cpu_variant"]
    assert report["torch"]["threads"] >= 1
    assert isinstance(report["gpu"]["cuda_available"], bool)
    assert report["models"]["gguf"] == str(demo_models.gguf)
    assert report["models"]["snac_dir"] == str(demo_models.snac_dir)
    llama, snac = report["checks"]["llama"], report["checks"]["snac"]
    assert llama["ok"] and snac["ok"], report["checks"]
    assert llama["step_s"] > 0 and llama["prompt_s"] > 0 and llama["prompt_tokens"] > 0
    assert snac["decode_s"] > 0 and snac["samples"] > 0
    assert report["ok"] is True


# Runs the CLI in-process and exits 99 if doctor itself imported a library that may crash it.
NO_HEAVY_IMPORTS = """
import sys
from tools.cli import main
code = main(["doctor", *sys.argv[1:]])
sys.exit(99 if {"torch", "llama_cpp"} & set(sys.modules) else code)
"""


def test_doctor_without_models_says_so_writes_nothing_and_fails(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    done = chorus("--models", str(models), python_code=NO_HEAVY_IMPORTS)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"no models: {models} is empty" in done.stdout
    assert "not run: no backbone .gguf" in done.stdout and "not run: no SNAC folder" in done.stdout
    assert "result: FAILED" in done.stdout
    assert list(models.iterdir()) == []

    missing = tmp_path / "absent"
    done = chorus("doctor", "--models", str(missing), "--json")
    assert done.returncode == 1
    assert "does not exist" in json.loads(done.stdout)["models"]["error"]
    assert not missing.exists()


def test_a_check_that_dies_by_a_signal_is_reported_not_fatal():
    # A real child killed by SIGILL, as a llama.cpp build for another CPU would be.
    result = doctor.run_child(
        ["-c", f"print({doctor.FACT_PREFIX!r} + '{{\"stage\": \"prompt decode\"}}', flush=True)\n"
               "import os, signal\nos.kill(os.getpid(), signal.SIGILL)"],
        timeout_s=60,
    )
    assert result["ok"] is False
    assert result["signal"] == "SIGILL"
    assert result["error"].startswith("died of SIGILL (illegal instruction")
    assert result["error"].endswith("during: prompt decode")
    assert "FAILED: died of SIGILL (illegal instruction" in doctor._check_line("llama", result)

    assert doctor.interpret_child(-11, "", "", 60)["error"].startswith("died of SIGSEGV")
    assert doctor.interpret_child(None, "", "", 5)["error"] == "did not finish in 5 s (killed)"
