"""Loads a SNAC directory (config.json + pytorch_model.bin) for serving.

Real and demo weights take the same path. The load is strict and the model is built
from its own config, never with `noise=False`: dropping the NoiseBlocks shifts the
module indices, and a non-strict load would then put weights in the wrong layers
without a word. Weight norm is folded into plain weights once, so that serving does
not recompute `g * v / |v|` on every call.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from snac import SNAC
from torch.nn.utils import parametrize

from services.codec_worker import numeric_mode


log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "pytorch_model.bin"


class ModelLoadError(RuntimeError):
    """The SNAC directory cannot be served; the message says why."""


@dataclass(frozen=True)
class LoadedSnac:
    model: SNAC
    device: torch.device
    # What decides its bits (numeric_mode.py): equal modes, equal audio.
    numeric_mode: str = ""

    @property
    def device_name(self) -> str:
        return self.device.type


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device(requested)


def fold_weight_norm(model: torch.nn.Module) -> int:
    """Replaces every weight-norm parametrization by the weight it computes."""
    folded = 0
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            folded += 1
    return folded


def load_snac(
    model_dir: Path | str, device: str = "auto", half: bool = False, mode: str = numeric_mode.DEFAULT
) -> LoadedSnac:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"SNAC model directory {model_dir} does not exist (build one with `chorus models demo`)")
    config_path, weights_path = model_dir / CONFIG_FILE, model_dir / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelLoadError(f"SNAC model directory {model_dir} has no {path.name}")
    try:
        model = SNAC.from_config(str(config_path))
    except (json.JSONDecodeError, TypeError) as err:
        raise ModelLoadError(f"{config_path} is not a valid SNAC config: {err}") from err
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(f"{weights_path} does not match {config_path}: {err}") from err

    target = resolve_device(device)
    if target.type == "cpu":
        try:
            reported_mode = numeric_mode.ensure(mode)
        except numeric_mode.NumericModeError as err:
            raise ModelLoadError(str(err)) from None
    else:
        reported_mode = f"{target.type}:{torch.cuda.get_device_name(target)}" if target.type == "cuda" else target.type
    if half and target.type != "cuda":
        log.warning("half precision is CUDA only; decoding in float32 on %s", target)
        half = False
    fold_weight_norm(model)
    model = model.to(target)
    if half:
        model = model.half()
    model.eval()
    loaded = LoadedSnac(model, target, reported_mode)
    log.info(
        "loaded SNAC from %s on %s (%s, numeric mode %s, %.1f M parameters)",
        model_dir, target, "float16" if half else "float32", reported_mode,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return loaded
