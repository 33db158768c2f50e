"""`chorus models demo`: writes the demo backbone GGUF and SNAC directory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_DIR = Path("models/demo")


def register(subparsers, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text)
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    demo = kinds.add_parser("demo", help="random-weight Orpheus backbone GGUF + SNAC 24 kHz directory")
    demo.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"output folder (default {DEFAULT_DIR})")
    demo.add_argument("--seed", type=int, default=0, help="weights seed; same seed, same bytes")
    demo.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from tools.demo_models.build import build_demo_models

    started = time.perf_counter()
    models = build_demo_models(args.dir, seed=args.seed, force=args.force)
    print(f"backbone: {models.gguf}")
    print(f"snac:     {models.snac_dir}")
    print(f"built in {time.perf_counter() - started:.1f}s")
    return 0
