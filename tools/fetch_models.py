"""Puts real weights where the services read them, or waits until they are there.

    python -m tools.fetch_models --dir /models --backbone URL --snac-config URL --snac-weights URL
    python -m tools.fetch_models --dir /models --wait

The first form is the chart's models Job: it downloads the backbone GGUF to
`<dir>/backbone.gguf` and the SNAC directory's two files to `<dir>/snac/`. Each file
is written under a temporary name and renamed when complete (and, with its
`--*-sha256`, checked), so a reader never sees half a file, and a file already
there with the right checksum is not fetched again. `HF_TOKEN` (or
`CHORUS_FETCH_TOKEN`), when set, is sent as a bearer token, for gated repositories.

The second form is the pods' init container: it returns once every file exists,
which by the rename means once every file is whole.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

SNAC_FILES = ("config.json", "pytorch_model.bin")
CHUNK = 1 << 20


class FetchError(Exception):
    """A download failed or its checksum did not match; the message says which."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, dest: Path, sha256: str = "", token: str = "") -> bool:
    """Downloads `url` to `dest` unless a file with that checksum is there; True if it downloaded."""
    if dest.exists() and (not sha256 or sha256_of(dest) == sha256):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(request, timeout=60) as response, partial.open("wb") as out:
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise FetchError(f"{url}: {err}") from err
    if sha256 and digest.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise FetchError(f"{url}: sha256 {digest.hexdigest()}, expected {sha256}")
    os.replace(partial, dest)
    return True


def expected_files(root: Path, backbone_name: str, snac_name: str) -> list[Path]:
    return [root / backbone_name, *(root / snac_name / name for name in SNAC_FILES)]


def wait_for(paths: list[Path], poll_s: float = 5.0, log=print, sleep=time.sleep) -> None:
    missing = [p for p in paths if not p.exists()]
    while missing:
        log(f"waiting for {', '.join(map(str, missing))}")
        sleep(poll_s)
        missing = [p for p in paths if not p.exists()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.fetch_models", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, required=True, help="the models volume (CHORUS_MODEL's directory)")
    p.add_argument("--backbone-name", default="backbone.gguf")
    p.add_argument("--snac-name", default="snac")
    p.add_argument("--wait", action="store_true", help="only wait until every file is there")
    for name in ("backbone", "snac-config", "snac-weights"):
        p.add_argument(f"--{name}", default="", help=f"URL of the {name.replace('-', ' ')}")
        p.add_argument(f"--{name}-sha256", default="", help="expected SHA-256 (hex)")
    args = p.parse_args(argv)

    backbone, config, weights = expected_files(args.dir, args.backbone_name, args.snac_name)
    if args.wait:
        wait_for([backbone, config, weights])
        return 0
    if not (args.backbone and args.snac_config and args.snac_weights):
        p.error("--backbone, --snac-config and --snac-weights are needed (or --wait)")
    token = os.environ.get("CHORUS_FETCH_TOKEN") or os.environ.get("HF_TOKEN", "")
    try:
        for url, dest, sha in ((args.snac_config, config, args.snac_config_sha256),
                               (args.snac_weights, weights, args.snac_weights_sha256),
                               (args.backbone, backbone, args.backbone_sha256)):
            fetched = fetch(url, dest, sha, token)
            print(f"{'fetched' if fetched else 'kept'} {dest}")
    except FetchError as err:
        print(f"fetch_models: {err}", file=sys.stderr)
        return 1
    usage = shutil.disk_usage(args.dir)
    print(f"{args.dir}: {usage.free / 2**30:.1f} GiB free")
    return 0


if __name__ == "__main__":
    sys.exit(main())
