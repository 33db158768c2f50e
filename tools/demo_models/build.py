"""Builds both demo models into one folder: backbone.gguf, snac/, and a manifest.

The manifest records the builder version and seed, so a folder written by an older
builder (or another seed) is rebuilt instead of silently reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tools.demo_models.backbone_gguf import write_demo_backbone
from tools.demo_models.snac_dir import write_demo_snac

# Bump when the bytes the builder writes change.
BUILDER_VERSION = 2
BACKBONE_FILE = "backbone.gguf"
SNAC_DIR = "snac"
MANIFEST = "demo-models.json"


@dataclass(frozen=True)
class DemoModels:
    root: Path

    @property
    def gguf(self) -> Path:
        return self.root / BACKBONE_FILE

    @property
    def snac_dir(self) -> Path:
        return self.root / SNAC_DIR

    def is_built(self, seed: int) -> bool:
        try:
            manifest = json.loads((self.root / MANIFEST).read_text())
        except (OSError, ValueError):
            return False
        return (
            manifest == {"builder_version": BUILDER_VERSION, "seed": seed}
            and self.gguf.is_file()
            and (self.snac_dir / "pytorch_model.bin").is_file()
        )


def build_demo_models(out_dir: Path, seed: int = 0, force: bool = False) -> DemoModels:
    """Writes the demo models unless this builder already wrote them with this seed."""
    models = DemoModels(Path(out_dir))
    if force or not models.is_built(seed):
        models.root.mkdir(parents=True, exist_ok=True)
        (models.root / MANIFEST).unlink(missing_ok=True)
        write_demo_backbone(models.gguf, seed=seed)
        write_demo_snac(models.snac_dir, seed=seed)
        (models.root / MANIFEST).write_text(json.dumps({"builder_version": BUILDER_VERSION, "seed": seed}) + "\n")
    return models
