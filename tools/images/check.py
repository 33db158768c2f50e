"""`python -m tools.images check`: every step in order, a summary on stdout, and the
whole record in OUT/report.json (with the SBOMs and the WAV beside it).

It fails (exit 1) when an image does not build, the stack does not serve the
synthesis, the gateway image holds torch or llama.cpp, a chart command is missing
from its image, or checkov fails a Dockerfile check. The chart's checkov findings
and pip-audit's vulnerabilities are reported, not failed on: the chart has its own
owner, and a new advisory against a pinned package should not turn every check red
before anyone can act on it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from chorus.realtime import cpuinfo

from tools.images import base as base_image
from tools.images import build, run, scan, sizes
from tools.images.podman import PodmanError, mounted, runtime_args

ROOT = build.ROOT
# What the gateway image must not hold, and what it must.
GATEWAY_ABSENT = ("torch", "llama_cpp", "snac")
GATEWAY_PRESENT = ("grpc", "av", "gateway")


def _machine() -> str:
    cpu = cpuinfo.field("model name") or platform.machine()
    return f"{cpu}, {len(os.sched_getaffinity(0))} CPUs, {platform.system()} {platform.release()}"


def _podman_version() -> str:
    done = subprocess.run(["podman", "--version"], capture_output=True, text=True)
    return done.stdout.strip()


def gateway_contents(ref: str, runtime: list[str]) -> dict:
    imports = run.imports_in(ref, runtime, GATEWAY_ABSENT + GATEWAY_PRESENT)
    with mounted(ref) as root:
        on_disk = sorted(str(p.relative_to(root)) for name in GATEWAY_ABSENT
                         for p in root.glob(f"opt/chorus/lib/python3*/site-packages/{name}"))
    ok = not any(imports[m] for m in GATEWAY_ABSENT) and all(imports[m] for m in GATEWAY_PRESENT) and not on_disk
    return {"imports": imports, "on_disk": on_disk, "ok": ok}


def llama_build(ref: str) -> dict | None:
    """The CPU image's llama.cpp build record (in wheels from the cache; a wheel the
    Dockerfile compiled has none)."""
    with mounted(ref) as root:
        records = sorted(root.glob("opt/chorus/lib/python3*/site-packages/llama_cpp/lib/chorus-build.json"))
        if not records:
            return None
        record = json.loads(records[0].read_text())
    return {k: record.get(k) for k in ("flavour", "key", "cmake_args", "instruction_sets")}


def check(args) -> int:
    started = time.monotonic()
    work, out = args.work, args.out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": _machine(),
                    "podman": _podman_version(), "command": "python -m tools.images " + " ".join(sys.argv[1:]),
                    "stages": {}, "problems": []}
    problems = report["problems"]

    def stage(name: str, t0: float) -> None:
        report["stages"][name] = round(time.monotonic() - t0, 1)

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        t0 = time.monotonic()
        base = None
        if args.base == "local":
            report["base"] = base_image.make(rebuild=args.rebuild_base, log=say)
            base = base_image.REF
        else:
            report["base"] = {"ref": "the Dockerfiles' default (python:3.11-slim-bookworm)"}
        stage("base", t0)

        t0 = time.monotonic()
        probe = base or "docker.io/library/python:3.11-slim-bookworm"
        runtime, how = runtime_args(probe, work)
        report["podman_run"] = how
        say(f"run: containers start with {how}")
        stage("runtime", t0)

        images = build.images()
        report["images"] = {}
        for name, image in images.items():
            entry = report["images"][name] = {"ref": image.ref, "dockerfile": str(image.dockerfile.relative_to(ROOT))}
            if not image.buildable:
                entry["built"] = False
                entry["why_not"] = build.NOT_HERE[name]
                say(f"build: {name} not built here: {entry['why_not']}")
                continue
            t0 = time.monotonic()
            wheels = build.prepare_wheels(work, image.dockerfile, log=say) if name == "cpu" and args.host_wheels \
                else None
            result = build.build(image, base, work, wheels, log=say)
            entry.update(built=result["ok"], build_seconds=result["seconds"], build_log=result["log"],
                         build_args=result["build_args"])
            stage(f"build {name}", t0)
            if not result["ok"]:
                problems.append(f"{name} image did not build; its log: {result['log']}\n{result['error'][-1500:]}")
                say(f"build: {name} FAILED after {result['seconds']} s (log {result['log']})")
                continue
            say(f"build: {image.ref} in {result['seconds']} s")
        built = {name: images[name] for name, e in report["images"].items() if e.get("built")}

        if "gateway" in built:
            t0 = time.monotonic()
            contents = report["images"]["gateway"]["contents"] = gateway_contents(built["gateway"].ref, runtime)
            say(f"gateway image imports: {contents['imports']}" + ("" if contents["ok"] else "  <-- WRONG"))
            if not contents["ok"]:
                problems.append(f"the gateway image's contents are wrong: {contents}")
            stage("gateway contents", t0)
        if "cpu" in built:
            record = report["images"]["cpu"]["llama_cpp"] = llama_build(built["cpu"].ref)
            say(f"cpu image llama.cpp: {record['flavour']} {record['cmake_args']}" if record
                else "cpu image llama.cpp: compiled by the Dockerfile (no cache build record)")
            if record and record["flavour"] != "portable":
                problems.append(f"the CPU image's llama.cpp is the {record['flavour']} build, not portable")

        if not args.skip_run and {"cpu", "gateway"} <= set(built):
            t0 = time.monotonic()
            models = args.models
            if not (models / "backbone.gguf").exists():
                subprocess.run([sys.executable, "-m", "tools.cli", "models", "demo", "--dir", str(models),
                                "--no-neutts"], cwd=ROOT, check=True)  # the images' run speaks Orpheus
            try:
                report["run"] = run.serve_and_say(built["cpu"].ref, built["gateway"].ref, models, work, runtime,
                                                  out / "hello.wav", log=say)
            except (PodmanError, OSError, RuntimeError) as err:
                report["run"] = {"ok": False, "error": str(err)}
                problems.append(f"the images did not serve the synthesis: {err}")
                say(f"run: FAILED: {err}")
            stage("run", t0)

        if not args.skip_sizes:
            t0 = time.monotonic()
            for name, image in built.items():
                entry = report["images"][name]
                entry.update(sizes.sizes(image.ref))
                entry["space"] = sizes.space(image.ref)
                if entry["space"]["apt_leftovers"]:
                    problems.append(f"{image.ref} keeps apt's caches: {entry['space']['apt_leftovers'][:4]}")
            stage("sizes", t0)

        if args.chart_commands and built:
            t0 = time.monotonic()
            from tools.images import chart

            report["chart_commands"] = chart.check_commands({n: i.ref for n, i in built.items()})
            for miss in report["chart_commands"]["missing"]:
                problems.append(f"chart command missing from its image: {miss}")
            stage("chart commands", t0)

        if not args.skip_scan:
            t0 = time.monotonic()
            venv = scan.scan_venv(work, log=say)
            report["checkov_dockerfiles"] = scan.checkov_dockerfiles(venv)
            for finding in report["checkov_dockerfiles"]["failed"]:
                problems.append(f"checkov {finding['id']} on {finding['file']}: {finding['name']}")
            try:
                report["checkov_chart"] = scan.checkov_chart(venv)
            except Exception as err:  # helm-python-sdk missing or not loading: report, do not fail
                report["checkov_chart"] = {"error": f"{type(err).__name__}: {err}"}
            for name, image in built.items():
                packages = scan.installed_packages(image.ref, runtime)
                sbom_path = out / f"sbom-{image.repository}.cdx.json"
                entry = report["images"][name]
                entry["packages"] = len(packages)
                entry["sbom"] = str(sbom_path)
                entry["sbom_components"] = scan.sbom(venv, packages, sbom_path)
                entry["audit"] = scan.audit(venv, packages, work, name)
            stage("scan", t0)
    except (PodmanError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        problems.append(f"{type(err).__name__}: {err}")
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    print(f"\nrecord: {out / 'report.json'}")
    return 1 if problems else 0


def summary(report: dict) -> str:
    lines = ["", f"== images check, {report['date']} on {report['machine']} ({report['podman']})"]
    lines.append(f"base: {report.get('base', {}).get('ref')}; podman run: {report.get('podman_run')}")
    for name, entry in report.get("images", {}).items():
        if not entry.get("built"):
            lines.append(f"{entry['ref']}: not built ({entry.get('why_not') or 'build failed'})")
            continue
        size = ""
        if "uncompressed_bytes" in entry:
            size = (f"{sizes.mib(entry['uncompressed_bytes'])} uncompressed, "
                    f"{sizes.mib(entry['gzip_bytes'])} gzipped")
        lines.append(f"{entry['ref']}: built in {entry['build_seconds']} s; {size}")
        space = entry.get("space") or {}
        if space:
            lines.append("  largest: " + ", ".join(f"{p} {sizes.mib(n)}" for p, n in space["top"][:5]))
            if space.get("site_packages"):
                lines.append("  site-packages: " + ", ".join(f"{Path(p).name} {sizes.mib(n)}"
                                                            for p, n in space["site_packages"][:6]))
        if "audit" in entry:
            audit = entry["audit"]
            if "error" in audit:
                lines.append(f"  pip-audit: could not run ({audit['error'][:300]})")
            else:
                vulns = audit["vulnerabilities"]
                lines.append(f"  SBOM: {entry['sbom']} ({entry['sbom_components']} components); pip-audit of "
                             f"{audit['packages']} packages: {len(vulns)} known vulnerabilities"
                             + "".join(f"\n    {v['package']} {v['version']}: {v['id']} "
                                       f"(fixed in {', '.join(v['fix_versions']) or 'no release yet'})"
                                       for v in vulns))
    if "run" in report:
        r = report["run"]
        lines.append("synthesis through the three containers: "
                     + (f"{r['seconds_of_audio']} s of audio in {r['wav']}" if r.get("ok") else f"FAILED {r}"))
    if "chart_commands" in report:
        c = report["chart_commands"]
        lines.append(f"chart commands found in their images: {c['checked']} checked, missing: {c['missing'] or 'none'}"
                     + (f"; not checked (image not built here): {', '.join(c['unbuilt'])}" if c["unbuilt"] else ""))
    if "checkov_dockerfiles" in report:
        d = report["checkov_dockerfiles"]
        lines.append(f"checkov Dockerfiles: {d['passed']} passed, {len(d['failed'])} failed, "
                     f"{len(d['skipped'])} skipped inline ({', '.join(sorted({s['id'] for s in d['skipped']}))})")
        for finding in d["failed"]:
            lines.append(f"  FAILED {finding['id']} {finding['file']} {finding['resource']}: {finding['name']}")
    chart_scan = report.get("checkov_chart") or {}
    if "error" in chart_scan:
        lines.append(f"checkov chart: not run ({chart_scan['error']})")
    for variant, found in chart_scan.items() if "error" not in chart_scan else ():
        lines.append(f"checkov chart ({variant} values): {found['passed']} passed, {len(found['failed'])} failed")
        by_check: dict[str, list[str]] = {}
        for finding in found["failed"]:
            by_check.setdefault(f"{finding['id']} {finding['name']}", []).append(finding["resource"])
        for check_name, resources in sorted(by_check.items()):
            lines.append(f"  {check_name}: {', '.join(sorted(set(resources)))}")
    lines.append("stages: " + ", ".join(f"{k} {v} s" for k, v in report["stages"].items()))
    lines.append(f"wall time: {report['wall_seconds']} s")
    lines.append("problems: " + ("none" if not report["problems"] else ""))
    lines += [f"  - {p}" for p in report["problems"]]
    return "\n".join(lines)
