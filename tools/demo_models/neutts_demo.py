"""Builds the NeuTTS-Air demo family into one folder: backbone.gguf, neucodec/, and a
voice store holding one voice, `demo`.

NeuTTS speaks only voices registered from reference audio, so the demo family comes
with one: 2 seconds of random NeuCodec codes, their audio through the demo decoder
(resampled to 16 kHz, as a reference is kept), and a transcript. Voices from
recordings are registered through the gateway, whose NeuCodec worker encodes them
with the demo encoder that neucodec/ also holds (random weights, so a cloned demo
voice sounds like no one).
Built on demand (`chorus serve`, `chorus models demo`), beside the Orpheus demo models, with its own
manifest so that a folder from an older builder is rebuilt.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chorus.speech import codecs, neutts

BUILDER_VERSION = 2  # 2: neucodec/ holds the encoder too
MANIFEST = "neutts-demo.json"
DEMO_VOICE = "demo"
DEMO_TRANSCRIPT = "This is the demo voice of Chorus, made of random codes."
REFERENCE_RATE = 16_000
REFERENCE_FRAMES = 100  # 2 s


@dataclass(frozen=True)
class NeuTtsDemo:
    root: Path

    @property
    def gguf(self) -> Path:
        return self.root / "backbone.gguf"

    @property
    def neucodec_dir(self) -> Path:
        return self.root / "neucodec"

    @property
    def voices(self) -> Path:
        return self.root / "voices"

    def is_built(self, seed: int) -> bool:
        try:
            manifest = json.loads((self.root / MANIFEST).read_text())
        except (OSError, ValueError):
            return False
        return (manifest == {"builder_version": BUILDER_VERSION, "seed": seed} and self.gguf.is_file()
                and (self.neucodec_dir / "pytorch_model.bin").is_file()
                and (self.neucodec_dir / "encoder.json").is_file() and (self.voices / DEMO_VOICE).is_dir())


def build_neutts_demo(out_dir: Path, seed: int = 0, force: bool = False) -> NeuTtsDemo:
    """Writes the demo family unless this builder already wrote it with this seed."""
    import torch

    from chorus.speech.voice_store import VoiceStore
    from services.codec_worker.neucodec_model import load_neucodec
    from tools.demo_models.neucodec_dir import write_demo_neucodec
    from tools.demo_models.neutts_gguf import write_demo_neutts_backbone

    demo = NeuTtsDemo(Path(out_dir))
    if not force and demo.is_built(seed):
        return demo
    demo.root.mkdir(parents=True, exist_ok=True)
    (demo.root / MANIFEST).unlink(missing_ok=True)
    write_demo_neutts_backbone(demo.gguf, seed=seed)
    write_demo_neucodec(demo.neucodec_dir, seed=seed)
    codes = np.random.default_rng(seed).integers(0, neutts.CODEBOOK_SIZE, REFERENCE_FRAMES)
    audio = load_neucodec(demo.neucodec_dir).decode(torch.from_numpy(codes)[None])[0].numpy()
    times = np.arange(int(audio.size * REFERENCE_RATE / neutts.SAMPLE_RATE)) / REFERENCE_RATE
    reference = np.interp(times, np.arange(audio.size) / neutts.SAMPLE_RATE, audio).astype(np.float32)
    shutil.rmtree(demo.voices / DEMO_VOICE, ignore_errors=True)
    VoiceStore(demo.voices).register(DEMO_VOICE, neutts.NAME, DEMO_TRANSCRIPT, reference, REFERENCE_RATE,
                                     codes={codecs.NEUCODEC_24KHZ: codes})
    (demo.root / MANIFEST).write_text(json.dumps({"builder_version": BUILDER_VERSION, "seed": seed}) + "\n")
    return demo
