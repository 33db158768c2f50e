"""The local base image: Debian bookworm with Python 3.11, made here with mmdebstrap.

The Dockerfiles default to python:3.11-slim-bookworm from Docker Hub; a machine that
reaches Debian's archive and PyPI but not Docker Hub builds on this one instead
(`--build-arg PYTHON_IMAGE=localhost/chorus-base:bookworm`). It holds what the
Dockerfiles ask of a base: python3 (3.11.2 in bookworm) with its venv module (which
brings Debian's pip), ca-certificates, and useradd (passwd).

It trusts what the host trusts: the host's extra CAs (/usr/local/share/ca-certificates,
e.g. a TLS-intercepting proxy's) are added, so pip inside a build reaches PyPI as it
does on the host. Debian's pip reads the system bundle, so nothing is mounted into
the build and nothing of it reaches the images' own layers. This base is for checks
on this machine; releases build on the public one.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tools.images.podman import PodmanError, config, image_exists, podman

REF = "localhost/chorus-base:bookworm"
SUITE = "bookworm"
PACKAGES = ("ca-certificates", "python3", "python3-venv", "passwd")
# Security and point-release updates too, as the public base has them.
SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
HOST_CAS = Path("/usr/local/share/ca-certificates")
# As Debian's slim images: no manuals, info pages, documentation (its copyright
# files stay) or translations, now or in anything a Dockerfile installs later
# (mmdebstrap keeps these in the base's dpkg configuration).
DPKG_OPTS = ("path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*", "path-exclude=/usr/share/doc/*",
             "path-include=/usr/share/doc/*/copyright", "path-exclude=/usr/share/locale/*",
             "path-include=/usr/share/locale/locale.alias")
# apt as Debian's official container images configure it: no package caches or
# downloaded .debs left in a layer after an install, no translations fetched.
# Without it each `apt-get install` leaves some 80 MiB of /var/cache/apt/*.bin.
APT_CONF = {
    "docker-clean": (
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
        '/var/cache/apt/*.bin || true"; };\n'
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
        '/var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'
    ),
    "docker-no-languages": 'Acquire::Languages "none";\n',
}


def missing_tools() -> list[str]:
    return [tool for tool in ("podman", "mmdebstrap") if shutil.which(tool) is None]


LABEL = "org.chorus.base.recipe"


def recipe(cas: list[Path]) -> str:
    """What the base is made of; a base with another recipe (other packages, sources or
    host CAs) is made again."""
    material = "\n".join([SUITE, *PACKAGES, *SOURCES, *APT_CONF.values(), *DPKG_OPTS, "no-pkgcache",
                          *(c.read_text() for c in cas)])
    return hashlib.sha256(material.encode()).hexdigest()[:20]


def make(rebuild: bool = False, ref: str = REF, log=print) -> dict:
    """Builds the base unless REF already exists with this recipe; returns what was done."""
    cas = sorted(HOST_CAS.glob("*.crt")) if HOST_CAS.is_dir() else []
    want = recipe(cas)
    if image_exists(ref) and not rebuild and (config(ref).get("Labels") or {}).get(LABEL) == want:
        return {"ref": ref, "built": False, "recipe": want}
    missing = missing_tools()
    if missing:
        raise PodmanError(f"{', '.join(missing)} not installed (apt-get install -y --no-install-recommends "
                          "mmdebstrap podman runc)")
    hooks = [f"--customize-hook=printf '%s' {shlex.quote(text)} > \"$1/etc/apt/apt.conf.d/{name}\""
             for name, text in APT_CONF.items()]
    if cas:
        hooks += ["--customize-hook=mkdir -p \"$1/usr/local/share/ca-certificates\"",
                  f"--customize-hook=copy-in {' '.join(map(str, cas))} /usr/local/share/ca-certificates/",
                  "--customize-hook=chroot \"$1\" update-ca-certificates --fresh >/dev/null"]
    # mmdebstrap's own cleanup finds the package caches through apt's configuration,
    # which no longer names them once docker-clean is in place: remove them here.
    hooks.append("--customize-hook=rm -f \"$1\"/var/cache/apt/*.bin")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chorus-base-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        log(f"base: mmdebstrap {SUITE} minbase + {', '.join(PACKAGES)}"
            + (f" (+ {len(cas)} host CA{'s' if len(cas) > 1 else ''})" if cas else ""))
        done = subprocess.run(["mmdebstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                               *(f"--dpkgopt={opt}" for opt in DPKG_OPTS), *hooks,
                               SUITE, str(tarball), *SOURCES], capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            raise PodmanError(f"mmdebstrap failed: {done.stderr[-2000:]}")
        podman("import", "--change", 'CMD ["/bin/bash"]', "--change", f"LABEL {LABEL}={want}", str(tarball), ref,
               timeout=600)
    return {"ref": ref, "built": True, "recipe": want, "seconds": round(time.monotonic() - started, 1),
            "packages": list(PACKAGES), "host_cas": [c.name for c in cas]}
