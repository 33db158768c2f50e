"""How big each image is and what takes the space.

Uncompressed: podman's size of the image (all layers, unpacked). Compressed: the
image as `podman save` writes it, gzipped, which is close to what a registry stores
and a node pulls (registries keep each layer gzipped). Where the space goes: du of
the image's top folders and of its Python packages, read from the image's
filesystem.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tools.images.podman import inspect, mounted


def sizes(ref: str) -> dict:
    uncompressed = int(inspect(ref)["Size"])
    # gzip -6, docker's and podman's level for layers they push.
    pipeline = subprocess.run(f"podman save --format docker-archive {ref} | gzip -6 -c | wc -c", shell=True,
                              capture_output=True, text=True, timeout=3600, check=True)
    return {"uncompressed_bytes": uncompressed, "gzip_bytes": int(pipeline.stdout.strip())}


def _du(paths: list[Path], root: Path) -> list[tuple[str, int]]:
    if not paths:
        return []
    done = subprocess.run(["du", "-x", "-s", "-B1", *map(str, paths)], capture_output=True, text=True, timeout=600)
    rows = []
    for line in done.stdout.splitlines():
        size, path = line.split("\t", 1)
        rows.append(("/" + str(Path(path).relative_to(root)), int(size)))
    return sorted(rows, key=lambda row: -row[1])


def space(ref: str, top: int = 8) -> dict:
    """The largest top-level folders, /usr/* and /opt/chorus site-packages entries."""
    with mounted(ref) as root:
        result = {"top": _du([p for p in root.iterdir() if p.is_dir() and not p.is_symlink()], root)[:top],
                  "usr": _du([p for p in (root / "usr").iterdir() if p.is_dir() and not p.is_symlink()],
                             root)[:4]}
        # apt's package caches and lists have no use at run time; a base or a RUN step
        # that leaves them costs tens of MiB per image.
        result["apt_leftovers"] = sorted("/" + str(p.relative_to(root)) for pattern in (
            "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_Packages*")
            for p in root.glob(pattern))
        site = sorted((root / "opt" / "chorus" / "lib").glob("python3*/site-packages"))
        if site:
            result["site_packages"] = _du([p for p in site[0].iterdir() if not p.name.endswith("-info")],
                                          root)[:top]
    return result


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"
