"""Writes a SNAC 24 kHz directory (config.json + pytorch_model.bin) with random weights.

The config is the real hubertsiuzdak/snac_24khz one, so the decoder has the real
architecture and cost; only the weights are random. The model is built with noise on
(the trained checkpoint has NoiseBlocks, and building without them shifts module
indices), and loaded elsewhere strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

SNAC_24KHZ_CONFIG = {
    "sampling_rate": 24000,
    "encoder_dim": 48,
    "encoder_rates": [2, 4, 8, 8],
    "decoder_dim": 1024,
    "decoder_rates": [8, 8, 4, 2],
    "attn_window_size": None,
    "codebook_size": 4096,
    "codebook_dim": 8,
    "vq_strides": [4, 2, 1],
    "noise": True,
    "depthwise": True,
}


def write_demo_snac(out_dir: Path, seed: int = 0) -> Path:
    """Writes the directory and returns it. Same seed, same bytes."""
    import torch
    from snac import SNAC

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(SNAC_24KHZ_CONFIG, indent=2) + "\n")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SNAC(**SNAC_24KHZ_CONFIG)
        # Random codebooks are drawn from a unit normal; give Snake alphas and
        # weight-norm gains a little spread so that layers are not all alike.
        for name, param in model.named_parameters():
            if name.endswith("alpha"):
                with torch.no_grad():
                    param.uniform_(0.5, 1.5)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out_dir / "pytorch_model.bin")
    return out_dir
