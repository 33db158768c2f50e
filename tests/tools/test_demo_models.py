"""Demo models load through the real loaders: llama.cpp for the GGUF, snac for SNAC."""

from __future__ import annotations

import ctypes
import hashlib
import json

import llama_cpp as llama
import numpy as np
import pytest
import torch

from chorus.speech import orpheus
from tools.demo_models.backbone_gguf import BackboneShape, llama3_rope_factors
from tools.demo_models.build import build_demo_models
from tools.demo_models.snac_dir import SNAC_24KHZ_CONFIG
from services.token_server.llama_backend import LlamaBackbone


@pytest.fixture(scope="module")
def backbone(gguf_path):
    bb = LlamaBackbone(gguf_path, n_ctx=512, n_batch=64, n_seq_max=1, threads=2)
    yield bb
    bb.close()


def piece(bb, token: int) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = llama.llama_token_to_piece(bb.vocab, token, buf, len(buf), 0, True)
    return buf.raw[:n]


def tokenize_special(bb, text: str) -> list[int]:
    data = text.encode()
    buf = (llama.llama_token * 64)()
    n = llama.llama_tokenize(bb.vocab, data, len(data), buf, 64, False, True)
    return list(buf[:n])


def test_gguf_vocabulary_and_special_ids(backbone):
    assert backbone.n_vocab == orpheus.VOCAB_SIZE
    assert llama.llama_vocab_bos(backbone.vocab) == orpheus.BOS
    assert llama.llama_vocab_eos(backbone.vocab) == orpheus.END_OF_TEXT
    for token in (orpheus.BOS, orpheus.END_OF_TEXT, *range(orpheus.START_OF_SPEECH, orpheus.END_OF_AI + 1)):
        attr = llama.llama_vocab_get_attr(backbone.vocab, token)
        assert attr & llama.LLAMA_TOKEN_ATTR_CONTROL, f"token {token} is not a CONTROL token"
    assert piece(backbone, orpheus.BOS) == b"<|begin_of_text|>"
    assert piece(backbone, orpheus.END_OF_TEXT) == b"<|eot_id|>"


@pytest.mark.parametrize("n", [0, 1, 2, 10, 4106, 28683])
def test_custom_tokens_map_to_128256_plus_n(backbone, n):
    assert piece(backbone, 128_256 + n) == f"<custom_token_{n}>".encode()
    assert tokenize_special(backbone, f"<custom_token_{n}>") == [128_256 + n]


def test_any_utf8_text_tokenizes_bos_first_and_round_trips(backbone):
    text = "tara: Grüße, 世界! <custom_token_5> 🎤"
    ids = backbone.tokenize(text)
    assert ids[0] == orpheus.BOS
    # User text never turns into special tokens.
    assert all(t < orpheus.BOS for t in ids[1:])
    assert b"".join(piece(backbone, t) for t in ids[1:]).decode() == text


def test_gguf_metadata_is_orpheus_shaped(gguf_path):
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    fields = {f.name: f for f in reader.fields.values()}

    def scalar(name):
        field = fields[name]
        return field.parts[field.data[0]].tolist()[0]

    assert scalar("llama.rope.freq_base") == 500_000.0
    assert scalar("llama.vocab_size") == orpheus.VOCAB_SIZE
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied embeddings
    rope = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    expected = llama3_rope_factors(BackboneShape())
    assert np.allclose(np.asarray(rope.data), expected)
    assert expected[0] == 1.0 and expected[-1] == 32.0  # high frequencies kept, low ones scaled


def test_backbone_decodes_a_prompt(backbone):
    from services.token_server.llama_backend import TokenBatch

    ids = orpheus.wrap_prompt(backbone.tokenize("tara: hello"))
    batch = TokenBatch(64, 1)
    index = batch.add(ids, 0, 0, True)
    backbone.decode(batch)
    logits = backbone.logits_at(index)
    assert logits.shape == (orpheus.VOCAB_SIZE,) and np.isfinite(logits).all()
    assert backbone.sequence_length(0) == len(ids)
    batch.free()


def test_snac_dir_loads_strictly_and_decodes_a_frame(snac_dir):
    from snac import SNAC

    config = json.loads((snac_dir / "config.json").read_text())
    assert config == SNAC_24KHZ_CONFIG
    model = SNAC(**config)
    state = torch.load(snac_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    assert 19.0e6 < params < 20.5e6
    l0, l1, l2 = orpheus.frames_to_layers([0, 1, 2, 3, 4095, 5, 6])
    codes = [torch.from_numpy(l)[None] for l in (l0, l1, l2)]
    with torch.inference_mode():
        audio = model.decode(codes)
    assert audio.shape == (1, 1, orpheus.SAMPLES_PER_FRAME)
    assert torch.isfinite(audio).all() and audio.abs().max() > 0


def test_builder_is_deterministic(tmp_path):
    a = build_demo_models(tmp_path / "a", seed=3)
    b = build_demo_models(tmp_path / "b", seed=3)
    c = build_demo_models(tmp_path / "c", seed=4)

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert digest(a.gguf) == digest(b.gguf) != digest(c.gguf)
    weights = "pytorch_model.bin"
    assert digest(a.snac_dir / weights) == digest(b.snac_dir / weights) != digest(c.snac_dir / weights)


def test_the_neutts_demo_family_is_deterministic_built_once_and_has_its_voice(tmp_path):
    from chorus.speech import codecs, neutts
    from chorus.speech.voice_store import VoiceStore
    from tools.demo_models.neutts_demo import DEMO_VOICE, build_neutts_demo

    a, b = build_neutts_demo(tmp_path / "a", seed=3), build_neutts_demo(tmp_path / "b", seed=3)

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert digest(a.gguf) == digest(b.gguf)
    assert digest(a.neucodec_dir / "pytorch_model.bin") == digest(b.neucodec_dir / "pytorch_model.bin")
    voice = VoiceStore(a.voices).get(DEMO_VOICE)
    assert voice.family == neutts.NAME and voice.reference_rate == 16_000 and voice.reference.size == 32_000
    assert np.array_equal(voice.codes[codecs.NEUCODEC_24KHZ], VoiceStore(b.voices).get(DEMO_VOICE).codes[
        codecs.NEUCODEC_24KHZ])
    written = a.gguf.stat().st_mtime_ns
    assert build_neutts_demo(tmp_path / "a", seed=3).is_built(3) and a.gguf.stat().st_mtime_ns == written
    assert not a.is_built(4)


def test_chorus_models_demo_builds_both_families_unless_told_orpheus_only(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "tools.cli", "models", "demo", "--dir", str(tmp_path / "both")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    both = tmp_path / "both" / "neutts"
    assert "neutts:" in done.stdout and (both / "backbone.gguf").is_file()
    assert (both / "voices" / "demo").is_dir() and (both / "neucodec" / "encoder.json").is_file()
    assert "Writing model shards" not in done.stderr  # transformers' progress bar is silenced
    orpheus_only = subprocess.run([sys.executable, "-m", "tools.cli", "models", "demo", "--dir",
                                   str(tmp_path / "orpheus"), "--no-neutts"], capture_output=True, text=True, timeout=300)
    assert orpheus_only.returncode == 0, orpheus_only.stderr[-2000:]
    assert (tmp_path / "orpheus" / "backbone.gguf").is_file() and not (tmp_path / "orpheus" / "neutts").exists()
