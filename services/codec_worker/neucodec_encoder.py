"""NeuCodec's encoder: a reference recording (mono, 16 kHz) in, its speech codes out (one
codebook, 50 a second, each in [0, 65536)).

Why Chorus needs it: NeuTTS-Air speaks in the voice of a prompt, and the prompt is the
reference recording's NeuCodec codes and its transcript. Without an encoder a voice can
only be registered with codes computed elsewhere; with it, from the recording itself.

Why it is written here rather than imported from neucodec (0.0.6, whose module tree and
arithmetic it follows: NeuCodec.encode_code, CodecEncoder, SemanticEncoder, and the
quantizer's encode half, vector-quantize-pytorch's ResidualFSQ): the package's
constructor downloads Wav2Vec2-BERT (facebook/w2v-bert-2.0) from a model hub, and it
pulls several dependencies (torchaudio, torchtune, vector-quantize-pytorch, the hub
client) for a few small pieces. What is taken from elsewhere and what is written here:

- Wav2Vec2-BERT and its log-mel feature extractor come from `transformers`, a
  well-kept implementation of both; the model is read from the directory's
  semantic_model/ folder (Hugging Face format: for real weights a copy of
  facebook/w2v-bert-2.0), never from the network. Only hidden_states[16] is read, so
  the layers above 16 are dropped at load (neucodec computes all 24). Where
  pytorch_model.bin holds semantic_model.* tensors, they are loaded over the folder's,
  as neucodec's loading (its checkpoint over the hub's model) does.
- The acoustic encoder (CodecEnc) is written with plain convolutions: neucodec trains
  them under weight norm, and the loader folds each (weight_g, weight_v) pair into one
  weight, so serving runs no reparametrisation.
- Its anti-aliased SnakeBeta activations (alias_free.py) compute their resampling
  filters; a checkpoint's copies of them are not read.
- The quantizer: ResidualFSQ(dim 2048, levels 4 x 8, one quantizer) projects to 8
  values, bounds them (tanh into the levels' range) and then, in its one FSQ layer,
  bounds them again and rounds: bound is applied twice, as neucodec's checkpoint was
  trained with. Each value rounds to a digit d in 0..3, the index is the digits in
  base 4 (the first value the least significant), and the decoder's _ResidualFsq maps d
  back to (d - 2) / 2.

The submodules carry neucodec's names (CodecEnc, SemanticEncoder_module, fc_prior; the
quantizer's project_in is read from generator.quantizer.project_in), so a real
checkpoint's pytorch_model.bin, the file the decoder loads from, loads by path.

Frames: neucodec pads the recording on the right to the next multiple of 320 samples
(by a whole 320 when it is one already), so the acoustic branch gives T // 320 + 1
frames; the semantic branch (10 ms log-mel frames of 25 ms, stacked in pairs) gives one
fewer, and both are cut to the shorter: T samples give T // 320 codes (encoded_frames).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.codec_worker.alias_free import Activation1d, SnakeBeta
from services.codec_worker.neucodec_model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    JsonShape,
    NeuCodecLoadError,
    NeuCodecShape,
    read_checkpoint,
)

if TYPE_CHECKING:
    from transformers import Wav2Vec2BertModel

log = logging.getLogger(__name__)

ENCODER_CONFIG_FILE = "encoder.json"
SEMANTIC_MODEL_DIR = "semantic_model"
INPUT_RATE = 16_000
FRAME_HOP = 320  # samples of 16 kHz audio per code: the semantic features' 10 ms hop, stacked in pairs
MIN_SAMPLES = FRAME_HOP  # fewer give no code
# w2v-bert-2.0's preprocessor_config.json, passed explicitly rather than read.
FEATURE_EXTRACTOR_ARGS = dict(feature_size=80, num_mel_bins=80, stride=2, sampling_rate=INPUT_RATE, padding_value=1.0)
SEMANTIC_INPUT_DIM = 80 * 2  # mel bins x stride: Wav2Vec2-BERT's feature_projection_input_dim

# The keys of a real checkpoint this module reads (the decoder's are skipped here).
_ENCODER_PREFIXES = ("CodecEnc.", "SemanticEncoder_module.", "fc_prior.")
_CHECKPOINT_PROJECT_IN = "generator.quantizer.project_in."
_PROJECT_IN = "quantizer_in."
# neucodec's module holds Wav2Vec2-BERT as semantic_model: a checkpoint may carry it.
_CHECKPOINT_SEMANTIC = "semantic_model."
_WEIGHT_NORM_PAIRS = (("weight_g", "weight_v"),
                      ("parametrizations.weight.original0", "parametrizations.weight.original1"))


@dataclass(frozen=True)
class NeuCodecEncoderShape(JsonShape):
    """The encoder's sizes. The defaults are neucodec 0.0.6's (the acoustic encoder about
    38 M parameters, the SemanticEncoder 13 M, fc_prior 4 M, and Wav2Vec2-BERT's first 16
    layers about 390 M of its 580 M); the demo model is smaller
    (tools/demo_models/neucodec_dir.py)."""

    what = "encoder config"

    ngf: int = 48
    up_ratios: tuple[int, ...] = field(default=(2, 2, 4, 4, 5))
    dilations: tuple[int, ...] = field(default=(1, 3, 9))
    acoustic_dim: int = 1024
    semantic_dim: int = 1024  # the SemanticEncoder's width in, inside and out: Wav2Vec2-BERT's hidden size
    semantic_layer: int = 16
    input_rate: int = INPUT_RATE

    def __post_init__(self) -> None:
        problems = []
        if self.ngf <= 0 or self.acoustic_dim <= 0 or self.semantic_dim <= 0:
            problems.append("ngf, acoustic_dim and semantic_dim must be positive")
        if not self.up_ratios or any(r <= 0 for r in self.up_ratios):
            problems.append(f"up_ratios must be positive strides, got {list(self.up_ratios)}")
        elif math.prod(self.up_ratios) != FRAME_HOP:
            problems.append(f"the acoustic hop, the product of up_ratios {list(self.up_ratios)}, is "
                            f"{math.prod(self.up_ratios)}; it must be {FRAME_HOP}, the semantic features' "
                            "hop (50 frames a second)")
        if not self.dilations or any(d <= 0 for d in self.dilations):
            problems.append(f"dilations must be positive, got {list(self.dilations)}")
        if self.semantic_layer < 1:
            problems.append(f"semantic_layer must be at least 1, got {self.semantic_layer}")
        if self.input_rate != INPUT_RATE:
            problems.append(f"input_rate must be {INPUT_RATE} (Wav2Vec2-BERT's features are 16 kHz), "
                            f"got {self.input_rate}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def hop(self) -> int:
        return math.prod(self.up_ratios)


def encoded_frames(sample_count: int) -> int:
    """How many codes `encode` gives for this many samples: sample_count // 320 (see the
    module's docstring); 0 below MIN_SAMPLES, which encode refuses."""
    return sample_count // FRAME_HOP if sample_count >= MIN_SAMPLES else 0


# --- the quantizer's encode half ------------------------------------------------------


def fsq_bound(z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """FSQ's bound: tanh into (-(L-1)/2, (L-1)/2) widened by 0.1 %, shifted by half a
    step for an even L so that rounding gives L integers (-L/2 .. L/2 - 1)."""
    half_l = (levels - 1).to(torch.float32) * (1 + 1e-3) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    shift = torch.atanh(offset / half_l)
    return torch.tanh(z + shift) * half_l - offset


def fsq_indices(z: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """ResidualFSQ's encode with one quantizer: project_in's output (..., len(levels)) ->
    int64 indices (...). bound twice (ResidualFSQ's, then its FSQ layer's), round, the
    digit is the rounded value + L // 2, the index the digits with basis (1, L0, L0 L1, ...)."""
    lv = torch.tensor(levels, dtype=torch.int64, device=z.device)
    basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.int64, device=z.device), lv[:-1]]), 0)
    rounded = torch.round(fsq_bound(fsq_bound(z.to(torch.float32), lv), lv)).to(torch.int64)
    digits = rounded + lv // 2
    return (digits * basis).sum(-1)


# --- the acoustic and semantic branches -----------------------------------------------


class _ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Activation1d(SnakeBeta(dim)),
            nn.Conv1d(dim, dim, kernel_size=7, dilation=dilation, padding=3 * dilation),
            Activation1d(SnakeBeta(dim)),
            nn.Conv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class _EncoderBlock(nn.Module):
    """Residual units at dim // 2, then a strided convolution to dim (time / stride)."""

    def __init__(self, dim: int, stride: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        half = dim // 2
        self.block = nn.Sequential(
            *[_ResidualUnit(half, d) for d in dilations],
            Activation1d(SnakeBeta(half)),
            nn.Conv1d(half, dim, kernel_size=2 * stride, stride=stride, padding=stride // 2 + stride % 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class AcousticEncoder(nn.Module):
    """neucodec's CodecEncoder: (batch, 1, T) at 16 kHz -> (batch, acoustic_dim, T / hop),
    T a multiple of the hop (channels first, where neucodec returns channels last)."""

    def __init__(self, shape: NeuCodecEncoderShape) -> None:
        super().__init__()
        width = shape.ngf
        blocks: list[nn.Module] = [nn.Conv1d(1, width, kernel_size=7, padding=3)]
        for stride in shape.up_ratios:
            width *= 2
            blocks.append(_EncoderBlock(width, stride, shape.dilations))
        self.conv_blocks = nn.Sequential(*blocks)
        self.conv_final_block = nn.Sequential(
            Activation1d(SnakeBeta(width)),
            nn.Conv1d(width, shape.acoustic_dim, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_final_block(self.conv_blocks(x))


class SemanticEncoder(nn.Module):
    """neucodec's SemanticEncoder (input, code and encode widths all `dim`):
    (batch, dim, frames) -> (batch, dim, frames).

    neucodec's residual branch starts with an in-place ReLU on the tensor its skip
    connection then adds, so the skip carries relu(initial_conv(x)), not
    initial_conv(x); written out here (the branch's own ReLU then changes nothing)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.initial_conv = nn.Conv1d(dim, dim, kernel_size=3, padding=1, bias=False)
        self.residual_blocks = nn.Sequential(
            nn.ReLU(),
            nn.Conv1d(dim, dim, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv1d(dim, dim, kernel_size=3, padding=1),
        )
        self.final_conv = nn.Conv1d(dim, dim, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.initial_conv(x))
        return self.final_conv(self.residual_blocks(h) + h)


class NeuCodecEncoder(nn.Module):
    """16 kHz samples -> NeuCodec codes, as neucodec's NeuCodec.encode_code (one
    utterance at a time). Inference only: built in eval mode, since Wav2Vec2-BERT's
    layer drop would otherwise skip layers at random.

    `semantic_model` is kept, cut to its first shape.semantic_layer layers (in place)."""

    def __init__(self, shape: NeuCodecEncoderShape, codec_shape: NeuCodecShape,
                 semantic_model: Wav2Vec2BertModel) -> None:
        super().__init__()
        from transformers import SeamlessM4TFeatureExtractor

        config = semantic_model.config
        problems = []
        if config.hidden_size != shape.semantic_dim:
            problems.append(f"its hidden size is {config.hidden_size}, encoder.json's semantic_dim "
                            f"{shape.semantic_dim}")
        if len(semantic_model.encoder.layers) < shape.semantic_layer:
            problems.append(f"it has {len(semantic_model.encoder.layers)} layers, and encoder.json's "
                            f"semantic_layer reads the output of layer {shape.semantic_layer}")
        if config.feature_projection_input_dim != SEMANTIC_INPUT_DIM:
            problems.append(f"it takes {config.feature_projection_input_dim} features a frame, not the "
                            f"{SEMANTIC_INPUT_DIM} (80 mel bins, 2 frames stacked) its feature extractor gives")
        if problems:
            raise ValueError("the Wav2Vec2-BERT model does not fit: " + "; ".join(problems))
        semantic_model.encoder.layers = semantic_model.encoder.layers[: shape.semantic_layer]
        config.num_hidden_layers = shape.semantic_layer

        self.shape = shape
        self.codec_shape = codec_shape
        self.semantic_model = semantic_model
        self.CodecEnc = AcousticEncoder(shape)
        self.SemanticEncoder_module = SemanticEncoder(shape.semantic_dim)
        self.fc_prior = nn.Linear(shape.semantic_dim + shape.acoustic_dim, codec_shape.vq_dim)
        self.quantizer_in = nn.Linear(codec_shape.vq_dim, len(codec_shape.levels))
        self.features = SeamlessM4TFeatureExtractor(**FEATURE_EXTRACTOR_ARGS)
        self.train(False)

    def latents(self, samples: torch.Tensor) -> torch.Tensor:
        """(T,) float32 samples, T a multiple of 320 (already padded) -> the quantizer's
        input, project_in's output (frames, len(levels))."""
        features = self.features(samples.numpy(), sampling_rate=INPUT_RATE, return_tensors="pt").input_features
        acoustic = self.CodecEnc(samples[None, None])
        hidden = self.semantic_model(features, output_hidden_states=True).hidden_states[self.shape.semantic_layer]
        semantic = self.SemanticEncoder_module(hidden.transpose(1, 2))
        frames = min(acoustic.shape[-1], semantic.shape[-1])
        joined = torch.cat([semantic[..., :frames], acoustic[..., :frames]], dim=1)
        return self.quantizer_in(self.fc_prior(joined.transpose(1, 2)))[0]

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """Mono float samples at 16 kHz, in [-1, 1] -> int32 codes (T // 320,).

        Same samples, same codes. Wav2Vec2-BERT's attention grows with the square of the
        length: references are seconds long, and callers bound them."""
        audio = check_samples(samples)
        with torch.inference_mode():
            padded = F.pad(torch.from_numpy(audio), (0, FRAME_HOP - audio.size % FRAME_HOP))
            codes = fsq_indices(self.latents(padded), self.codec_shape.levels)
        return codes.numpy().astype(np.int32)


def check_samples(samples: np.ndarray) -> np.ndarray:
    """The samples as a contiguous float32 (T,) array, or a ValueError saying what to fix."""
    if not isinstance(samples, np.ndarray):
        raise ValueError(f"reference audio must be a numpy array of float samples, got {type(samples).__name__}")
    if samples.ndim != 1:
        raise ValueError(f"reference audio must be mono, one dimension of samples; got shape {samples.shape} "
                         "(mix the channels down first)")
    if not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"reference audio must be float samples in [-1, 1], got {samples.dtype} "
                         "(scale integer PCM by its full scale, e.g. divide int16 by 32768)")
    if samples.size < MIN_SAMPLES:
        raise ValueError(f"reference audio has {samples.size} samples; it needs at least {MIN_SAMPLES} "
                         f"({1000 * MIN_SAMPLES // INPUT_RATE} ms at {INPUT_RATE} Hz) for one code")
    audio = np.ascontiguousarray(samples, dtype=np.float32)
    if not np.isfinite(audio).all():
        raise ValueError("reference audio holds NaN or infinite samples")
    return audio


# --- loading ---------------------------------------------------------------------------


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replaces each weight-norm pair by the weight it stands for, X.weight = g v / |v|
    (|v| over every dimension but the first: torch's weight_norm with dim=0). Both
    spellings are read: X.weight_g / X.weight_v (torch.nn.utils.weight_norm, as
    neucodec's checkpoint has them) and X.parametrizations.weight.original0 / original1
    (torch.nn.utils.parametrizations.weight_norm). Other keys pass unchanged; half a
    pair is left as it is, for the caller to report."""
    out = dict(state)
    for g_suffix, v_suffix in _WEIGHT_NORM_PAIRS:
        for key in [k for k in state if k == g_suffix or k.endswith("." + g_suffix)]:
            stem = key[: -len(g_suffix)]  # "X." or ""
            if stem + v_suffix not in state:
                continue
            g, v = state[key].to(torch.float32), state[stem + v_suffix].to(torch.float32)
            norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
            out[stem + "weight"] = v * (g / norm)
            del out[key], out[stem + v_suffix]
    return out


def encoder_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's tensors of a neucodec checkpoint, under NeuCodecEncoder's names:
    weight norm folded, the resampling filters (keys ending in .filter) dropped, the
    quantizer's project_in renamed."""
    picked = {}
    for key, value in state.items():
        if key.endswith(".filter"):
            continue
        if key.startswith(_ENCODER_PREFIXES):
            picked[key] = value
        elif key.startswith(_CHECKPOINT_PROJECT_IN):
            picked[_PROJECT_IN + key[len(_CHECKPOINT_PROJECT_IN):]] = value
    return {k: v.to(torch.float32) for k, v in fold_weight_norm(picked).items()}


def _checkpoint_key(key: str) -> str:
    """A NeuCodecEncoder key as a neucodec checkpoint spells it."""
    return _CHECKPOINT_PROJECT_IN + key[len(_PROJECT_IN):] if key.startswith(_PROJECT_IN) else key


def _check_widths(state: dict[str, torch.Tensor], codec_shape: NeuCodecShape, weights: Path, config: Path) -> None:
    """The two widths that tie the encoder to the decoder, checked by name before the
    general shape check so that the message says which side is wrong."""
    prior = state.get("fc_prior.weight")
    if prior is not None and prior.dim() == 2 and prior.shape[0] != codec_shape.vq_dim:
        raise NeuCodecLoadError(f"{weights}: fc_prior gives {prior.shape[0]} channels, but the quantizer takes "
                                f"vq_dim = {codec_shape.vq_dim} ({config})")
    project_in = state.get(_PROJECT_IN + "weight")
    if project_in is not None and project_in.dim() == 2 and (
            project_in.shape[0] != len(codec_shape.levels) or project_in.shape[1] != codec_shape.vq_dim):
        raise NeuCodecLoadError(
            f"{weights}: generator.quantizer.project_in maps {project_in.shape[1]} -> {project_in.shape[0]}, but "
            f"{config} has vq_dim {codec_shape.vq_dim} and {len(codec_shape.levels)} FSQ levels")


def _take_semantic_tensors(model: NeuCodecEncoder, state: dict[str, torch.Tensor], weights: Path) -> int:
    """neucodec loads its checkpoint over the hub's Wav2Vec2-BERT, so a checkpoint's own
    semantic_model.* tensors, where it has them, win over semantic_model/'s; those of the
    dropped layers are not needed. Returns how many were taken."""
    own = model.semantic_model.state_dict()
    taken = {}
    for key, value in state.items():
        if key.startswith(_CHECKPOINT_SEMANTIC) and key[len(_CHECKPOINT_SEMANTIC):] in own:
            name = key[len(_CHECKPOINT_SEMANTIC):]
            if value.shape != own[name].shape:
                raise NeuCodecLoadError(f"{weights}: {key} has shape {tuple(value.shape)}, but {SEMANTIC_MODEL_DIR}/ "
                                        f"has {tuple(own[name].shape)}")
            taken[name] = value.to(torch.float32)
    if taken:
        model.semantic_model.load_state_dict(taken, strict=False)
    return len(taken)


def load_neucodec_encoder(model_dir: Path | str) -> NeuCodecEncoder | None:
    """Reads encoder.json (a NeuCodecEncoderShape), config.json (the decoder's
    NeuCodecShape: the quantizer's width and levels), semantic_model/ (Wav2Vec2-BERT) and
    the encoder's tensors of pytorch_model.bin. None for a directory without encoder.json
    (a decoder alone); NeuCodecLoadError for one that has it and cannot be served."""
    model_dir = Path(model_dir)
    encoder_config = model_dir / ENCODER_CONFIG_FILE
    if not encoder_config.is_file():
        return None
    config, weights, semantic_dir = model_dir / CONFIG_FILE, model_dir / WEIGHTS_FILE, model_dir / SEMANTIC_MODEL_DIR
    for path in (config, weights):
        if not path.is_file():
            raise NeuCodecLoadError(f"NeuCodec model directory {model_dir} has no {path.name}")
    if not semantic_dir.is_dir():
        raise NeuCodecLoadError(f"NeuCodec model directory {model_dir} has {ENCODER_CONFIG_FILE} but no "
                                f"{SEMANTIC_MODEL_DIR}/ folder (a Wav2Vec2-BERT model, e.g. facebook/w2v-bert-2.0)")
    try:
        codec_shape = NeuCodecShape.from_json(config.read_text())
    except (ValueError, TypeError) as err:
        raise NeuCodecLoadError(f"{config} is not a valid NeuCodec config: {err}") from err
    try:
        shape = NeuCodecEncoderShape.from_json(encoder_config.read_text())
    except (ValueError, TypeError) as err:
        raise NeuCodecLoadError(f"{encoder_config} is not a valid NeuCodec encoder config: {err}") from err
    try:
        from transformers import Wav2Vec2BertModel
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        raise NeuCodecLoadError(f"the NeuCodec encoder needs the transformers package: {err}") from err
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no progress bar in a server's log
    try:
        semantic = Wav2Vec2BertModel.from_pretrained(str(semantic_dir), local_files_only=True, dtype=torch.float32)
    except Exception as err:  # a missing or foreign file: transformers raises several kinds
        raise NeuCodecLoadError(f"{semantic_dir} cannot be read as a Wav2Vec2-BERT model: {err}") from err
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    state = read_checkpoint(weights)
    wanted = encoder_tensors(state)
    _check_widths(wanted, codec_shape, weights, config)
    try:
        model = NeuCodecEncoder(shape, codec_shape, semantic)
    except ValueError as err:
        raise NeuCodecLoadError(f"{semantic_dir} does not fit {encoder_config}: {err}") from err
    try:
        missing, unexpected = model.load_state_dict(wanted, strict=False)
    except RuntimeError as err:  # a shape that does not match the config
        raise NeuCodecLoadError(f"{weights} does not match {encoder_config}: {err}") from err
    missing = [_checkpoint_key(k) for k in missing if not k.startswith(_CHECKPOINT_SEMANTIC)]
    if missing:
        raise NeuCodecLoadError(f"{weights} lacks {len(missing)} encoder tensors, e.g. {missing[:3]} (a weight-norm "
                                "convolution's weight may be given as weight_g and weight_v)")
    if unexpected:
        unexpected = [_checkpoint_key(k) for k in unexpected]
        raise NeuCodecLoadError(f"{weights} has {len(unexpected)} encoder tensors that {encoder_config} does not "
                                f"describe, e.g. {unexpected[:3]}")
    taken = _take_semantic_tensors(model, state, weights)
    model.train(False)
    semantic_count = sum(p.numel() for p in model.semantic_model.parameters())
    log.info("loaded NeuCodec encoder from %s (%.1f M parameters, %.1f M of them Wav2Vec2-BERT's first %d layers%s)",
             model_dir, sum(p.numel() for p in model.parameters()) / 1e6, semantic_count / 1e6, shape.semantic_layer,
             f", {taken} tensors from {WEIGHTS_FILE}" if taken else "")
    return model
