"""Scans: checkov on the Dockerfiles and on the rendered Helm chart, and per image a
CycloneDX SBOM of its installed Python packages and a pip-audit of that set.

The scanners live in their own virtual environment (work/scanvenv, pinned below),
not in the project's: checkov alone pins dozens of packages the services never
need. The package list is read in the image, by the image's own python
(importlib.metadata, so an image without pip is listed as well); the SBOM and the
audit are made from it on the host. pip-audit asks PyPI's vulnerability data for
each name and version; a package that is not on PyPI (chorus-tts itself) cannot be
audited and is left out, and a local version label (torch's +cpu) is dropped, as
PyPI's advisories name the upstream release.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.images.podman import podman

ROOT = Path(__file__).resolve().parents[2]
PINS = ("checkov==3.3.30", "pip-audit==2.10.1", "cyclonedx-bom==4.6.1")
NOT_ON_PYPI = {"chorus-tts"}


def scan_venv(work: Path, log=print) -> Path:
    venv = work / "scanvenv"
    stamp = venv / ".chorus-pins"
    if stamp.exists() and stamp.read_text() == "\n".join(PINS):
        return venv
    log(f"scan: installing {', '.join(PINS)} into {venv}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *PINS], check=True,
                   timeout=1800, capture_output=True)
    stamp.write_text("\n".join(PINS))
    return venv


def _checkov(venv: Path, args: list[str]) -> dict:
    done = subprocess.run([str(venv / "bin" / "checkov"), *args, "--output", "json", "--compact"],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT)
    try:
        reports = json.loads(done.stdout)
    except ValueError:
        raise RuntimeError(f"checkov printed no JSON (exit {done.returncode}): {done.stderr[-2000:]}")
    reports = reports if isinstance(reports, list) else [reports]
    failed, skipped, passed = [], [], 0
    for report in reports:
        results = report.get("results") or {}
        passed += (report.get("summary") or {}).get("passed", 0)
        for check in results.get("failed_checks") or []:
            failed.append({"id": check["check_id"], "name": check["check_name"],
                           "file": check["file_path"].lstrip("/"), "resource": check["resource"],
                           "lines": check.get("file_line_range")})
        for check in results.get("skipped_checks") or []:
            skipped.append({"id": check["check_id"], "file": check["file_path"].lstrip("/"),
                            "resource": check["resource"]})
    return {"passed": passed, "failed": failed, "skipped": skipped}


def checkov_dockerfiles(venv: Path) -> dict:
    files = sorted((ROOT / "deploy" / "docker").glob("*.Dockerfile"))
    return _checkov(venv, ["--framework", "dockerfile", *(a for f in files for a in ("-f", str(f)))])


# The chart as shipped, and with every optional object on (the values test_deploy renders).
CHART_VALUES = {"defaults": None,
                "gpu": {"tokenServer": {"gpu": {"enabled": True}}, "codec": {"gpu": {"enabled": True}}}}


def checkov_chart(venv: Path) -> dict:
    sys.path.insert(0, str(ROOT / "deploy"))
    from render_k8s import render_chart

    results = {}
    for variant, values in CHART_VALUES.items():
        with tempfile.TemporaryDirectory(prefix=f"chorus-chart-{variant}-") as tmp:
            for name, text in render_chart(values).items():
                (Path(tmp) / name).write_text(text)
            found = _checkov(venv, ["--framework", "kubernetes", "--directory", tmp])
        for check in found["failed"] + found["skipped"]:
            check["file"] = Path(check["file"]).name
        results[variant] = found
    return results


def installed_packages(ref: str, runtime: list[str]) -> list[tuple[str, str]]:
    """(name, version) of every distribution the image's python sees."""
    probe = ("import importlib.metadata as m, json\n"
             "print(json.dumps(sorted({(d.metadata['Name'], d.version) for d in m.distributions()})))")
    done = podman("run", "--rm", *runtime, "--network", "none", "--read-only", "--entrypoint", "python", ref,
                  "-c", probe, timeout=300)
    return [tuple(row) for row in json.loads(done.stdout.decode().strip().splitlines()[-1])]


def sbom(venv: Path, packages: list[tuple[str, str]], out: Path) -> int:
    """A CycloneDX 1.6 JSON SBOM at OUT: chorus-tts (from pyproject.toml) as the root
    component, every other installed distribution as a component with its PyPI purl.
    Returns the component count."""
    requirements = "".join(f"{name}=={version}\n" for name, version in packages
                           if name.lower() not in NOT_ON_PYPI)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([str(venv / "bin" / "cyclonedx-py"), "requirements", "--of", "JSON", "--sv", "1.6",
                           "--pyproject", str(ROOT / "pyproject.toml"), "--output-reproducible", "-o", str(out), "-"],
                          input=requirements, text=True, capture_output=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"cyclonedx-py failed ({done.returncode}): {done.stderr[-1500:]}")
    return len(json.loads(out.read_text()).get("components") or [])


def audit(venv: Path, packages: list[tuple[str, str]], work: Path, name: str) -> dict:
    """pip-audit of the pinned set, asking PyPI's vulnerability data, then OSV's where
    PyPI's cannot be had: {"service", "vulnerabilities", "skipped"}, or {"error"} when
    neither answers. A service that reports every package as not found did not answer
    (a mirror or proxy that serves PyPI's simple index but not its JSON API)."""
    audited = [(n, v.split("+", 1)[0]) for n, v in packages if n.lower() not in NOT_ON_PYPI]
    requirements = work / f"audit-{name}.txt"
    requirements.write_text("".join(f"{n}=={v}\n" for n, v in audited))
    failures = []
    for service in ("pypi", "osv"):
        done = subprocess.run([str(venv / "bin" / "pip-audit"), "--requirement", str(requirements), "--no-deps",
                               "--disable-pip", "--vulnerability-service", service, "--format", "json",
                               "--progress-spinner", "off"], capture_output=True, text=True, timeout=1800)
        try:
            report = json.loads(done.stdout)
        except ValueError:
            failures.append(f"{service}: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
            continue
        vulns, skipped = [], []
        for dep in report.get("dependencies", []):
            if dep.get("skip_reason"):
                skipped.append(f"{dep['name']}: {dep['skip_reason']}")
            for vuln in dep.get("vulns", []):
                vulns.append({"package": dep["name"], "version": dep["version"], "id": vuln["id"],
                              "aliases": vuln.get("aliases", []), "fix_versions": vuln.get("fix_versions", [])})
        if audited and len(skipped) == len(audited):
            failures.append(f"{service}: every package not found ({skipped[0]})")
            continue
        return {"service": service, "packages": len(audited), "vulnerabilities": vulns, "skipped": skipped,
                "not_audited": sorted(NOT_ON_PYPI & {n.lower() for n, _ in packages})}
    return {"error": "no vulnerability service answered: " + "; ".join(failures), "packages": len(audited)}
