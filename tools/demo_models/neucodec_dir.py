"""Writes a NeuCodec decoder directory (config.json + pytorch_model.bin) with random weights.

The real decoder (hidden 1024, 12 transformer blocks, about 190 M parameters) would
need several cores to stream in real time; the demo keeps every real size that the
wire and the audio see (65,536 codes, 50 frames a second, hop 480, n_fft 1,920,
24 kHz, the 2,048-wide quantizer output) and scales the body down to hidden 256 and
4 blocks. Initialisation follows neucodec's: convolutions from a normal of std 0.02
truncated at 2 std, biases zero, linear layers torch's default.
"""

from __future__ import annotations

from pathlib import Path

from services.codec_worker.neucodec_model import CONFIG_FILE, WEIGHTS_FILE, NeuCodecShape

DEMO_SHAPE = NeuCodecShape(hidden=256, depth=4, heads=4)


def write_demo_neucodec(out_dir: Path, seed: int = 0, shape: NeuCodecShape = DEMO_SHAPE) -> Path:
    """Writes the directory and returns it. Same seed, same bytes."""
    import torch

    from services.codec_worker.neucodec_model import NeuCodecDecoder

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(shape.to_json())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NeuCodecDecoder(shape)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv1d):
                torch.nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
                torch.nn.init.zeros_(module.bias)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out_dir / WEIGHTS_FILE)
    return out_dir
