"""Generates the Python stubs for protos/ into chorus/proto/.

Stubs are committed so that an install needs no code generation, and a test
regenerates them into a temporary folder and fails when the committed ones are
stale. protoc writes absolute imports (`from tts.v1 import common_pb2`), which
would need protos/ on sys.path; they are rewritten to live under chorus.proto.
Two packages are generated: Chorus's own `tts.v1`, and `riva/` (NVIDIA Riva's TTS
API, third party, restated for the gateway's Riva front end).

    python -m chorus.rpc.protogen          # regenerate
    python -m chorus.rpc.protogen --check  # exit 1 when committed stubs differ
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "chorus" / "proto"
_IMPORT = re.compile(r"^from (tts\.v1|riva) import ", re.MULTILINE)


def generate(out_root: Path) -> list[Path]:
    """Runs protoc for every .proto under protos/ and returns the files written."""
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = []
    for path in sorted(out_root.rglob("*")):
        if path.suffix in {".py", ".pyi"}:
            text = _IMPORT.sub(r"from chorus.proto.\1 import ", path.read_text())
            path.write_text(text)
            written.append(path)
    for package in {p.parent for p in written} | {out_root, out_root / "tts"}:
        init = package / "__init__.py"
        if not init.exists():
            init.write_text("")
            written.append(init)
    return written


def stale_files(out_root: Path = OUT_ROOT) -> list[str]:
    """Names (relative to `out_root`) the generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        stale = []
        for fresh in sorted(fresh_root.rglob("*")):
            if fresh.is_file() and fresh.suffix in {".py", ".pyi"}:
                committed = out_root / fresh.relative_to(fresh_root)
                if not committed.exists() or not filecmp.cmp(fresh, committed, shallow=False):
                    stale.append(str(committed.relative_to(out_root)))
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when committed stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated stubs in chorus/proto (run `python -m chorus.rpc.protogen`):", *stale, sep="\n  ")
            return 1
        print("generated stubs are up to date")
        return 0
    for path in generate(OUT_ROOT):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
