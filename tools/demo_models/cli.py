"""`chorus models demo`: writes the demo backbone GGUF and SNAC directory, and the
NeuTTS-Air demo family under DIR/neutts (`--no-neutts`: Orpheus's only)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_DIR = Path("models/demo")


def register(subparsers, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text)
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    demo = kinds.add_parser("demo", help="random-weight demo models of both families: an Orpheus backbone GGUF + "
                                         "SNAC 24 kHz directory, and NeuTTS-Air's under DIR/neutts")
    demo.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"output folder (default {DEFAULT_DIR})")
    demo.add_argument("--seed", type=int, default=0, help="weights seed; same seed, same bytes")
    demo.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    demo.add_argument("--neutts", action=argparse.BooleanOptionalAction, default=True,
                      help="the NeuTTS-Air demo family under DIR/neutts: a Qwen2 backbone GGUF, a NeuCodec decoder "
                           "and encoder, and a voice store with one voice, demo (what `chorus serve` serves beside "
                           "Orpheus); --no-neutts builds Orpheus's only (default: both)")
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from tools.demo_models.build import build_demo_models

    started = time.perf_counter()
    models = build_demo_models(args.dir, seed=args.seed, force=args.force)
    print(f"backbone: {models.gguf}")
    print(f"snac:     {models.snac_dir}")
    if args.neutts:
        from tools.demo_models.neutts_demo import build_neutts_demo

        family = build_neutts_demo(models.root / "neutts", seed=args.seed, force=args.force)
        print(f"neutts:   {family.gguf}, {family.neucodec_dir}, voices in {family.voices}")
    print(f"built in {time.perf_counter() - started:.1f}s")
    return 0
