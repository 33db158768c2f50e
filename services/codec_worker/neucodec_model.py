"""NeuCodec's decoder, for serving: speech codes in (one codebook, 50 a second), 24 kHz out.

Written from neucodec 0.0.6's module tree (its CodecDecoderVocos behind NeuCodec.fc_post_a)
with the same parameter names, so that the decoder half of a real checkpoint loads by
path; the encoder half (Wav2Vec2-BERT and the acoustic encoder) is not needed to speak
and is skipped. The package is not a dependency: constructing its NeuCodec downloads
Wav2Vec2-BERT from a model hub, and its decoder pulls torchtune and vector-quantize-
pytorch for two small pieces, written here:

- FSQ indices to vectors: the index's 8 base-4 digits d, each mapped to (d - 2) / 2
  (one quantizer, so the residual scale is 1), then the quantizer's project_out.
- Rotary embedding: neucodec applies torchtune's RotaryPositionalEmbeddings to q and k
  shaped (batch, heads, time, head_dim), which torchtune reads as (batch, seq, heads,
  head_dim). The angle then follows the head index, not time, and q and k of a head
  turn alike, so every attention score q.k is what it was without it (a rotation keeps
  dot products). It is left out: same scores up to float rounding.

Why no decode of it can stream exactly: every frame's spectrum depends on every code of
the utterance, through GroupNorm (statistics over all of time) in the four residual
blocks and bidirectional attention in every transformer block. neucodec_streaming.py
therefore decodes windows with context, and `decode` here, the whole utterance in one
pass, is the reference it is measured against (docs/benchmarks.md "NeuCodec").
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "pytorch_model.bin"
# The keys of a real checkpoint this module reads; the rest is the encoder's.
_DECODER_PREFIXES = ("generator.quantizer.project_out.", "generator.backbone.", "generator.head.", "fc_post_a.")


class NeuCodecLoadError(RuntimeError):
    """The NeuCodec directory cannot be served; the message says why."""


class JsonShape:
    """A frozen dataclass of sizes kept as a JSON file beside the weights: tuples are
    written as lists and read back as tuples, and unknown keys are refused (a typo
    would otherwise silently take a default). `what` names the file in messages."""

    what = "config"

    def to_json(self) -> str:
        raw = {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}
        return json.dumps(raw, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str):
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"the {cls.what} is not a JSON object")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown {cls.what} keys {sorted(unknown)}")
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in raw.items()})


@dataclass(frozen=True)
class NeuCodecShape(JsonShape):
    """The decoder's sizes. The defaults are neucodec 0.0.6's (about 190 M parameters
    in the decoder); the demo model is smaller (tools/demo_models/neucodec_dir.py)."""

    hidden: int = 1024
    depth: int = 12
    heads: int = 16
    vq_dim: int = 2048
    levels: tuple[int, ...] = field(default=(4, 4, 4, 4, 4, 4, 4, 4))
    hop: int = 480
    sample_rate: int = 24_000
    norm_groups: int = 32

    def __post_init__(self) -> None:
        problems = []
        if self.hidden <= 0 or self.heads <= 0 or self.hidden % self.heads:
            problems.append(f"hidden ({self.hidden}) must be a positive multiple of heads ({self.heads})")
        if self.norm_groups <= 0 or self.hidden % self.norm_groups:
            problems.append(f"hidden ({self.hidden}) must be a multiple of norm_groups ({self.norm_groups})")
        if self.depth < 0 or self.vq_dim <= 0 or self.hop <= 0 or self.sample_rate <= 0:
            problems.append("depth must be at least 0, and vq_dim, hop and sample_rate positive")
        if not self.levels or any(level < 2 for level in self.levels):
            problems.append(f"every FSQ level must be at least 2, got {list(self.levels)}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def n_fft(self) -> int:
        return 4 * self.hop

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop


class _ResidualFsq(nn.Module):
    """The quantizer's decode half: index -> FSQ digits -> project_out."""

    def __init__(self, shape: NeuCodecShape) -> None:
        super().__init__()
        levels = torch.tensor(shape.levels, dtype=torch.int64)
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.int64), levels[:-1]]), 0)
        self.register_buffer("_levels", levels, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.project_out = nn.Linear(len(shape.levels), shape.vq_dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        digits = (codes[..., None] // self._basis) % self._levels
        half = (self._levels // 2).to(torch.float32)
        return self.project_out((digits.to(torch.float32) - half) / half)


class _RmsNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + self.eps) * self.weight


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim, bias=False)
        self.fc2 = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class _TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.att_norm = _RmsNorm(dim)
        self.ffn_norm = _RmsNorm(dim)
        self.att = _Attention(dim, heads)
        self.mlp = _Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.att(self.att_norm(x))
        return x + self.mlp(self.ffn_norm(x))


class _ResnetBlock(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class _Backbone(nn.Module):
    def __init__(self, shape: NeuCodecShape) -> None:
        super().__init__()
        dim = shape.hidden
        self.embed = nn.Conv1d(dim, dim, kernel_size=7, padding=3)
        self.prior_net = nn.Sequential(_ResnetBlock(dim, shape.norm_groups), _ResnetBlock(dim, shape.norm_groups))
        self.transformers = nn.Sequential(*[_TransformerBlock(dim, shape.heads) for _ in range(shape.depth)])
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.post_net = nn.Sequential(_ResnetBlock(dim, shape.norm_groups), _ResnetBlock(dim, shape.norm_groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, dim) -> (b, t, dim)
        x = self.prior_net(self.embed(x.transpose(1, 2))).transpose(1, 2)
        x = self.transformers(x)
        return self.final_layer_norm(self.post_net(x.transpose(1, 2)).transpose(1, 2))


class _Istft(nn.Module):
    """Holds the synthesis window under neucodec's name (generator.head.istft.window)."""

    def __init__(self, n_fft: int) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(n_fft))


class _Head(nn.Module):
    def __init__(self, shape: NeuCodecShape) -> None:
        super().__init__()
        self.out = nn.Linear(shape.hidden, shape.n_fft + 2)
        self.istft = _Istft(shape.n_fft)


class _Generator(nn.Module):
    def __init__(self, shape: NeuCodecShape) -> None:
        super().__init__()
        self.quantizer = _ResidualFsq(shape)
        self.backbone = _Backbone(shape)
        self.head = _Head(shape)


class NeuCodecDecoder(nn.Module):
    """codes (batch, frames) -> spectra (batch, n_fft/2 + 1, frames) -> audio (batch, frames * hop)."""

    def __init__(self, shape: NeuCodecShape) -> None:
        super().__init__()
        self.shape = shape
        self.generator = _Generator(shape)
        self.fc_post_a = nn.Linear(shape.vq_dim, shape.hidden)

    def spectra(self, codes: torch.Tensor) -> torch.Tensor:
        """Complex spectra of every frame, from the frames given (and only them)."""
        if codes.dtype != torch.int64 or codes.dim() != 2:
            raise ValueError("codes must be int64 of shape (batch, frames)")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.shape.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.shape.codebook_size})")
        g = self.generator
        x = g.backbone(self.fc_post_a(g.quantizer(codes)))
        mag, phase = g.head.out(x).transpose(1, 2).chunk(2, dim=1)
        mag = torch.clip(torch.exp(mag), max=1e2)  # neucodec's guard against huge magnitudes
        return torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))

    def frames_to_time(self, spectra: torch.Tensor) -> torch.Tensor:
        """Each frame's windowed inverse FFT: (batch, n_fft, frames), before overlap-add."""
        return torch.fft.irfft(spectra, self.shape.n_fft, dim=1) * self.generator.head.istft.window[None, :, None]

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The whole utterance in one pass, as neucodec's decode_code: (batch, frames * hop)."""
        return istft_same(self.frames_to_time(self.spectra(codes)), self.generator.head.istft.window, self.shape.hop)


def istft_same(frames: torch.Tensor, window: torch.Tensor, hop: int) -> torch.Tensor:
    """Overlap-add with 'same' padding, as neucodec's ISTFT: (batch, n_fft, T) windowed
    frames -> (batch, T * hop) samples, divided by the summed squared window."""
    n_fft, count = frames.shape[1], frames.shape[2]
    pad = (n_fft - hop) // 2
    size = (count - 1) * hop + n_fft
    fold = dict(output_size=(1, size), kernel_size=(1, n_fft), stride=(1, hop))
    y = F.fold(frames, **fold)[:, 0, 0, pad:-pad]
    envelope = F.fold(window.square().expand(1, count, -1).transpose(1, 2), **fold).reshape(-1)[pad:-pad]
    return y / envelope


def read_checkpoint(weights: Path) -> dict:
    """A NeuCodec checkpoint's tensors by name (no pickled code runs), or NeuCodecLoadError."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: torch raises several kinds
        raise NeuCodecLoadError(f"{weights} cannot be read as a checkpoint: {err}") from err
    if not isinstance(state, dict):
        raise NeuCodecLoadError(f"{weights} holds no state dict")
    return state


def load_neucodec(model_dir: Path | str) -> NeuCodecDecoder:
    """Reads config.json (a NeuCodecShape) and pytorch_model.bin (a neucodec
    checkpoint, or a demo one): every decoder parameter must be there, the encoder's
    keys are skipped."""
    model_dir = Path(model_dir)
    config, weights = model_dir / CONFIG_FILE, model_dir / WEIGHTS_FILE
    for path in (config, weights):
        if not path.is_file():
            raise NeuCodecLoadError(f"NeuCodec model directory {model_dir} has no {path.name}")
    try:
        shape = NeuCodecShape.from_json(config.read_text())
    except (ValueError, TypeError) as err:
        raise NeuCodecLoadError(f"{config} is not a valid NeuCodec config: {err}") from err
    model = NeuCodecDecoder(shape)
    state = read_checkpoint(weights)
    wanted = {k: v for k, v in state.items() if k.startswith(_DECODER_PREFIXES)}
    try:
        missing, _ = model.load_state_dict(wanted, strict=False)
    except RuntimeError as err:  # a shape that does not match the config
        raise NeuCodecLoadError(f"{weights} does not match {config}: {err}") from err
    missing = [k for k in missing if k != "generator.head.istft.window"]
    if missing:
        raise NeuCodecLoadError(f"{weights} lacks {len(missing)} decoder tensors, e.g. {missing[:3]}")
    model.eval()
    log.info("loaded NeuCodec decoder from %s (%.1f M parameters)", model_dir,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model
