"""`python -m tools.images check`: build the images here, run them, size and scan them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tools.images.build import ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.images", description=__doc__)
    parser.add_argument("command", choices=("check",))
    parser.add_argument("--base", choices=("local", "public"), default="local",
                        help="local: a Debian bookworm base made here with mmdebstrap (needs only Debian's archive); "
                             "public: the Dockerfiles' default, python:3.11-slim-bookworm from Docker Hub")
    parser.add_argument("--rebuild-base", action="store_true", help="make the local base again")
    parser.add_argument("--no-host-wheels", dest="host_wheels", action="store_false",
                        help="build the CPU image as docker would, compiling llama.cpp (10+ minutes)")
    parser.add_argument("--models", type=Path, default=ROOT / "models" / "demo",
                        help="weights mounted at /models (default: the demo models, built if missing)")
    parser.add_argument("--work", type=Path,
                        default=Path(os.environ.get("CHORUS_IMAGES_WORK", Path.home() / ".cache/chorus/images")),
                        help="staged wheels, scanner venv, logs [CHORUS_IMAGES_WORK]")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "images",
                        help="report.json, SBOMs, the WAV (default out/images)")
    parser.add_argument("--skip-run", action="store_true")
    parser.add_argument("--skip-sizes", action="store_true")
    parser.add_argument("--skip-scan", action="store_true")
    parser.add_argument("--no-chart-commands", dest="chart_commands", action="store_false")
    args = parser.parse_args(argv)
    from tools.images.check import check

    return check(args)


if __name__ == "__main__":
    sys.exit(main())
