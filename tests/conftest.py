"""Shared fixtures: the demo models are built once per test session.

Set CHORUS_TEST_MODELS to a folder to reuse models across runs (the README's test
command points it at models/demo, which the demo command also builds).

Before any test, the backbone must decode on this CPU: a llama.cpp library built for
instructions this CPU does not run kills every test that starts a token server, and
hundreds of errors would hide the one cause. So the session starts with setup's
smoke check and stops at once, with setup's explanation, when it dies.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import grpc
import pytest

# Tests live in a folder per tier (tests/chorus/, tests/token_server/, ...) and share
# helpers from tests/support/ and fixtures from each other's modules by module name:
# every folder is importable from any test, whichever folder pytest collects first.
_TESTS = Path(__file__).resolve().parent
for _folder in sorted(p for p in _TESTS.iterdir() if p.is_dir() and (p.name == "support" or any(p.glob("test_*.py")))):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from otlp_receiver import receiver  # noqa: E402,F401 (an OTLP receiver fixture for any test)

# MKL fixes its numeric mode at its first call, in whichever test that is: importing
# the codec package first asks for the mode the codec's bits are tested in.
import services.codec_worker  # noqa: F401,E402

from chorus.proto.tts.v1 import gateway_pb2_grpc


def pytest_sessionstart(session) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        return  # a gateway-only install: no backbone to check
    if hasattr(session.config, "workerinput"):
        return  # a pytest-xdist worker: its controller checked before starting it
    from tools.demo_models.build import build_demo_models
    from tools.llama_wheel.cache import installed_record
    from tools.llama_wheel.smoke import describe_death, run_smoke, smoke_command

    if not os.environ.get("CHORUS_TEST_MODELS"):
        os.environ["CHORUS_TEST_MODELS"] = tempfile.mkdtemp(prefix="chorus-test-models-")
    models = build_demo_models(Path(os.environ["CHORUS_TEST_MODELS"]))
    result = run_smoke(smoke_command(models.gguf))
    if result.ok:
        return
    if result.signal is not None:
        reason = describe_death("The backbone smoke check (load the demo backbone, decode a prompt and one token)",
                                result.signal, installed_record())
        pytest.exit(f"{reason} Every test that starts a token server would fail the same way, so none ran. "
                    "Run ./scripts/setup.sh, which smoke-checks and rebuilds the library for this CPU, "
                    "or `chorus doctor` for a report.", returncode=3)
    pytest.exit(f"The backbone smoke check failed (exit code {result.returncode}):\n{result.output}", returncode=3)


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    """`-m serial` alone (./scripts/test.sh's second phase) imports only the test files
    that mark something serial, instead of importing every file to deselect it."""
    if (config.getoption("markexpr", "") == "serial" and collection_path.suffix == ".py"
            and collection_path.name.startswith("test_") and "mark.serial" not in collection_path.read_text()):
        return True
    return None


def pytest_collection_modifyitems(session, config, items) -> None:
    """Modules marked `slow` run first. pytest-xdist hands test files to its workers in
    this order as each one frees up, so the longest files start early and the workers
    finish together, instead of one worker starting a long file as the other runs out
    of work. The order inside a module is kept."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory):
    from tools.demo_models.build import build_demo_models

    root = os.environ.get("CHORUS_TEST_MODELS")
    out = Path(root) if root else tmp_path_factory.mktemp("demo-models")
    return build_demo_models(out)


@pytest.fixture(scope="session")
def gguf_path(demo_models) -> Path:
    return demo_models.gguf


@pytest.fixture(scope="session")
def snac_dir(demo_models) -> Path:
    return demo_models.snac_dir


@pytest.fixture(scope="module")
def gateway(stack):
    """A Synthesis stub on the gateway of the module's own `stack` fixture (a stack of
    real processes)."""
    with grpc.insecure_channel(stack.gateway_address) as channel:
        yield gateway_pb2_grpc.SynthesisServiceStub(channel)


@pytest.fixture
def no_tracing_left_over():
    """Tracing set up by one test never exports the next one's spans (modules that
    trace take it with `pytestmark = pytest.mark.usefixtures("no_tracing_left_over")`)."""
    from chorus.telemetry import tracing

    tracing.shutdown_tracing()
    yield
    tracing.shutdown_tracing()
