"""Builds both demo models into one folder: backbone.gguf and snac/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chorus.demo.backbone_gguf import write_demo_backbone
from chorus.demo.snac_dir import write_demo_snac

BACKBONE_FILE = "backbone.gguf"
SNAC_DIR = "snac"


@dataclass(frozen=True)
class DemoModels:
    root: Path

    @property
    def gguf(self) -> Path:
        return self.root / BACKBONE_FILE

    @property
    def snac_dir(self) -> Path:
        return self.root / SNAC_DIR

    def exists(self) -> bool:
        return self.gguf.is_file() and (self.snac_dir / "pytorch_model.bin").is_file()


def build_demo_models(out_dir: Path, seed: int = 0, force: bool = False) -> DemoModels:
    """Writes the demo models unless they are already there (or `force`)."""
    models = DemoModels(Path(out_dir))
    if force or not models.exists():
        write_demo_backbone(models.gguf, seed=seed)
        write_demo_snac(models.snac_dir, seed=seed)
    return models
