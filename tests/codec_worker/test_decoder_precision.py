"""The decoder's bf16 precision: its own bits, as exact as fp32's, close to fp32's audio.

A bf16 stream must keep the promise fp32 keeps (tests/codec_worker/test_codec_determinism.py):
the same bits however its frames are chunked, whichever streams share its forwards,
on 1 or more torch threads, and after a resume from zero state, since that is
what failover between two bf16 workers of one mode relies on. Its audio differs from
fp32's in the low bits only: above SNR_FLOOR_DB against fp32 on the demo model.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chorus.proto.tts.v1 import codec_pb2, codec_pb2_grpc
from chorus.speech.orpheus import SAMPLES_PER_FRAME
from services.codec_worker import numeric_mode, precision
from services.codec_worker.__main__ import build_config, parse_args
from services.codec_worker.channel_mix import ChannelMix
from services.codec_worker.config import CodecWorkerConfig
from services.codec_worker.model import load_snac
from services.codec_worker.server import start_server
from services.codec_worker.streaming_decoder import StreamingSnacDecoder
from test_codec_determinism import assert_bit_identical, random_frames, run

SNR_FLOOR_DB = 30.0  # measured 43.8 dB (noise off and on), AMD EPYC, AVX512-BF16
SEED = 2**64 - 777

native = pytest.mark.skipif(
    precision.native_bf16_isa() is None,
    reason="bf16 bits are measured on native bf16 kernels; 'auto' never picks bf16 on this CPU",
)


@pytest.fixture(scope="module")
def model(snac_dir):
    return load_snac(snac_dir, device="cpu").model


@pytest.fixture(scope="module")
def bf16(model):
    return StreamingSnacDecoder(model, precision="bf16")


@pytest.fixture(scope="module")
def fp32(model):
    return StreamingSnacDecoder(model, precision="fp32")


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


STREAM = dict(frames=random_frames(21), seed=SEED)
PARTNERS = [dict(frames=random_frames(k + 30), seed=k, deterministic=k % 3 == 0) for k in range(15)]
IRREGULAR = [1, 3, 2, 5, 1, 1, 7, 16, 2]


@pytest.fixture(scope="module")
def reference(bf16):
    """One frame a step, alone, one thread."""
    return run(bf16, [STREAM], lambda step: [(0, 1)])[0]


@native
@pytest.mark.parametrize(
    "schedule",
    [lambda step: [(0, 2)], lambda step: [(0, 5)], lambda step: [(0, 16)],
     lambda step: [(0, IRREGULAR[step % len(IRREGULAR)])]],
    ids=["2-frame steps", "5-frame steps", "16-frame steps", "irregular steps"],
)
def test_bf16_chunking_changes_no_bit(bf16, reference, schedule):
    assert_bit_identical(reference, run(bf16, [STREAM], schedule)[0])


@native
def test_bf16_batch_partners_change_no_bit(bf16, reference):
    assert_bit_identical(reference, run(bf16, [STREAM, *PARTNERS], lambda step: [(k, 1) for k in range(16)])[0])
    staggered = run(bf16, [STREAM, *PARTNERS[:5]],
                    lambda step: [(k, 1 + (step + k) % 3) for k in range(6) if step >= k])
    assert_bit_identical(reference, staggered[0])


@native
@pytest.mark.parametrize("threads", [2, 3])
def test_bf16_thread_count_changes_no_bit(bf16, reference, threads):
    got = run(bf16, [STREAM, *PARTNERS[:2]], lambda step: [(k, 4) for k in range(3)], threads=threads)
    assert_bit_identical(reference, got[0])


@native
@pytest.mark.parametrize("resume_frame,chunk", [(3, 1), (11, 4)])
def test_bf16_resume_from_zero_state_continues_bit_for_bit(bf16, reference, resume_frame, chunk):
    resume_sample = resume_frame * SAMPLES_PER_FRAME + 321
    resumed = dict(STREAM, first_frame_index=resume_frame - 3, resume_from_sample=resume_sample)
    got = run(bf16, [resumed, PARTNERS[0]], lambda step: [(0, chunk), (1, 1)])[0]
    assert got[0] == resume_sample
    assert_bit_identical(reference, got)


@native
@pytest.mark.parametrize("steps_per_frame", [4, 256], ids=["by rows", "by columns"])
@pytest.mark.parametrize("out_channels,bias", [(64, True), (7, False)])
def test_a_bf16_channel_mix_gives_each_step_the_same_bits_in_any_batch(steps_per_frame, out_channels, bias):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_channels, 48, generator=gen)
    b = torch.randn(out_channels, generator=gen) if bias else None
    mix = ChannelMix(weight, b, steps_per_frame, torch.bfloat16)
    x = torch.randn(5, 48, 300, generator=gen)
    torch.set_num_threads(1)
    whole = mix(x)
    assert whole.dtype == torch.float32
    expected = F.conv1d(x, weight[..., None], b)
    # bf16 keeps 8 significant bits: inputs and output rounded to ~0.4% each.
    assert torch.allclose(whole, expected, rtol=0.02, atol=0.1)
    assert not torch.equal(whole, expected)
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        for batch, lo, steps in ((1, 0, 1), (1, 7, 3), (2, 100, 17), (5, 3, 40), (3, 0, 300)):
            part = mix(x[:batch, :, lo : lo + steps].contiguous())
            assert torch.equal(part, whole[:batch, :, lo : lo + steps]), (threads, batch, lo, steps)


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2)
                               / np.sum((reference.astype(np.float64) - other) ** 2)))


@pytest.mark.parametrize("deterministic", [True, False], ids=["noise off", "noise on"])
def test_bf16_audio_is_fp32_audio_within_the_snr_floor(fp32, bf16, deterministic):
    stream = dict(STREAM, deterministic=deterministic)
    (_, want), (_, got) = (run(d, [stream], lambda step: [(0, 2)])[0] for d in (fp32, bf16))
    assert len(got) == len(want) == len(STREAM["frames"]) * SAMPLES_PER_FRAME
    assert np.sqrt(np.mean(want**2)) > 0.01, "the reference must not be near silence"
    assert got.tobytes() != want.tobytes(), "bf16 must actually run: it gives other bits"
    assert snr_db(want, got) > SNR_FLOOR_DB


def test_the_decoder_takes_fp32_or_bf16_only(model):
    assert StreamingSnacDecoder(model).precision == "fp32"
    with pytest.raises(ValueError, match="precision.resolve"):
        StreamingSnacDecoder(model, precision="auto")
    with pytest.raises(ValueError, match="must be one of fp32, bf16, got 'fp16'"):
        StreamingSnacDecoder(model, precision="fp16")


# --- resolve and the reported mode -------------------------------------------------


@pytest.mark.parametrize(
    "flags, cap, isa",
    [
        ({"avx512f", "avx512_bf16"}, "", "avx512_bf16"),
        ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "", "amx_bf16"),
        ({"avx512f", "avx512_bf16", "amx_bf16"}, "AVX512_CORE_BF16", "avx512_bf16"),
        ({"avx512f", "avx512_bf16", "amx_bf16"}, "avx512_core_amx", "amx_bf16"),
        ({"avx512f", "avx512_bf16", "amx_bf16"}, "ALL", "amx_bf16"),
        ({"avx512f", "avx512_bf16"}, "AVX512_CORE", None),
        ({"avx2", "avx512f"}, "", None),
        (set(), "", None),
    ],
)
def test_native_bf16_is_read_from_cpu_flags_and_onednn_cap(flags, cap, isa):
    assert precision.native_bf16_isa(frozenset(flags), cap) == isa


@pytest.mark.parametrize("flags, auto", [({"avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16"), ({"avx2"}, "fp32")])
def test_auto_is_bf16_only_on_native_bf16(monkeypatch, flags, auto):
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(precision, "_cpuinfo", lambda: ("GenuineIntel", frozenset(flags)))
    assert precision.resolve("auto") == auto
    assert precision.resolve("fp32") == "fp32" and precision.resolve("bf16") == "bf16"


def test_auto_here_follows_this_cpu():
    assert precision.resolve("auto") == ("bf16" if precision.native_bf16_isa() else "fp32")


def test_resolve_rejects_unknown_names():
    with pytest.raises(ValueError, match="one of auto, fp32, bf16, got 'half'"):
        precision.resolve("half")


def test_the_reported_mode_names_precision_vendor_and_bf16_kernels(monkeypatch):
    assert numeric_mode.with_precision("mkl-non-intel", "fp32") == "mkl-non-intel"
    monkeypatch.setattr(precision, "_cpuinfo", lambda: ("AuthenticAMD", frozenset({"avx512_bf16"})))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert numeric_mode.with_precision("mkl-non-intel", "bf16") == "mkl-non-intel+bf16:AuthenticAMD:avx512_bf16"
    monkeypatch.setattr(precision, "_cpuinfo", lambda: ("GenuineIntel", frozenset({"avx512_bf16", "amx_bf16"})))
    assert numeric_mode.with_precision("mkl-avx2-strict", "bf16") == "mkl-avx2-strict+bf16:GenuineIntel:amx_bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert numeric_mode.with_precision("mkl-compatible", "bf16") == "mkl-compatible+bf16:GenuineIntel:avx512_bf16"
    monkeypatch.setattr(precision, "_cpuinfo", lambda: ("GenuineIntel", frozenset({"avx2"})))
    assert numeric_mode.with_precision("mkl-avx2-strict", "bf16") == "mkl-avx2-strict+bf16:GenuineIntel:emulated-avx2"
    assert numeric_mode.with_precision("cuda:NVIDIA H100", "bf16", "cuda") == "cuda:NVIDIA H100+bf16"


# --- the worker's setting ----------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"decoder_precision": "fp16"}, "decoder_precision must be one of auto, fp32, bf16, got 'fp16'"),
        ({"decoder_precision": "bf16", "half": True, "device": "cuda"}, "decoder_precision bf16 needs a float32 model"),
    ],
)
def test_config_rejects_bad_precisions(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        CodecWorkerConfig(model_dir=tmp_path, **overrides)


def test_the_flag_and_env_set_the_precision(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CHORUS_DECODER_PRECISION", raising=False)
    base = ["--model-dir", str(tmp_path), "--torch-threads", "1"]
    assert build_config(parse_args(base)).decoder_precision == "auto"
    assert build_config(parse_args([*base, "--decoder-precision", "bf16"])).decoder_precision == "bf16"
    monkeypatch.setenv("CHORUS_DECODER_PRECISION", "fp32")
    assert build_config(parse_args(base)).decoder_precision == "fp32"
    monkeypatch.setenv("CHORUS_DECODER_PRECISION", "fast")
    with pytest.raises(SystemExit):
        parse_args(base)
    assert "CHORUS_DECODER_PRECISION" in capsys.readouterr().err


@pytest.mark.parametrize("requested", ["fp32", "bf16"])
def test_a_worker_reports_its_precision_in_its_numeric_mode(snac_dir, requested):
    async def scenario():
        config = CodecWorkerConfig(model_dir=snac_dir, device="cpu", calibrate=False, decoder_precision=requested)
        running = await start_server(config, port=0)
        try:
            async with grpc.aio.insecure_channel(running.address) as channel:
                load = await codec_pb2_grpc.CodecServiceStub(channel).GetLoad(codec_pb2.GetLoadRequest())
            return load.numeric_mode, running.components["decoder"].precision
        finally:
            await running.stop(1)

    reported, used = asyncio.run(scenario())
    assert used == requested
    base = numeric_mode.current()
    assert reported == (base if requested == "fp32" else f"{base}+bf16:{precision.bf16_kernels()}")
