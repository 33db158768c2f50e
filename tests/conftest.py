"""Shared fixtures: the demo models are built once per test session.

Set CHORUS_TEST_MODELS to a folder to reuse models across runs (the README's test
command points it at models/demo, which the demo command also builds).
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from otlp_receiver import receiver  # noqa: F401 (an OTLP receiver fixture for any test)

from chorus.proto.tts.v1 import gateway_pb2_grpc


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
