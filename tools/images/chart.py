"""The chart's commands against the built images: every container, init container,
exec probe and lifecycle hook the chart renders names a command, and that command
must be in the image the chart runs it from (found on the image's PATH in its
filesystem, executable; for `python -m MODULE`, the module in the image's
site-packages). The images are matched by the chart's `repository:tag`, so a
values.yaml whose names or tags differ from what the build produces finds nothing
to check against and fails too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from tools.images.podman import env, mounted, resolve_command

ROOT = Path(__file__).resolve().parents[2]
# Value sets that between them render every container and probe form the chart has.
VALUES = {
    "defaults": None,
    "demo-models": {"models": {"source": "demo"}},
    "fetch-models": {"models": {"accessModes": ["ReadWriteMany"], "fetch": {
        "enabled": True,
        "backbone": {"url": "https://models.example.com/backbone.gguf", "sha256": ""},
        "snacConfig": {"url": "https://models.example.com/snac/config.json", "sha256": ""},
        "snacWeights": {"url": "https://models.example.com/snac/pytorch_model.bin", "sha256": ""}}}},
    "gpu": {"tokenServer": {"gpu": {"enabled": True}}, "codec": {"gpu": {"enabled": True}}},
    "tls": {"tls": {"enabled": True, "issuerRef": {"name": "ca", "kind": "ClusterIssuer"}},
            "jaeger": {"enabled": True}},
}


def render(values) -> list[dict]:
    sys.path.insert(0, str(ROOT / "deploy"))
    from render_k8s import render_chart

    return [doc for text in render_chart(values).values() for doc in yaml.safe_load_all(text) if doc]


def commands(objects: list[dict]) -> list[tuple[str, str, list[str]]]:
    """(where, image, command) for every command the objects run."""
    found = []
    for obj in objects:
        spec = obj.get("spec") or {}
        pod = (spec.get("jobTemplate", {}).get("spec", {}).get("template") or spec.get("template") or {}).get("spec")
        if not pod:
            continue
        for kind in ("initContainers", "containers"):
            for container in pod.get(kind) or []:
                where = f"{obj['kind']}/{obj['metadata']['name']} {container['name']}"
                if container.get("command"):
                    found.append((where, container["image"], [str(c) for c in container["command"]]))
                for hook in ("livenessProbe", "readinessProbe", "startupProbe"):
                    command = (container.get(hook) or {}).get("exec", {}).get("command")
                    if command:
                        found.append((f"{where} {hook}", container["image"], [str(c) for c in command]))
                for hook, handler in (container.get("lifecycle") or {}).items():
                    command = (handler or {}).get("exec", {}).get("command")
                    if command:
                        found.append((f"{where} {hook}", container["image"], [str(c) for c in command]))
    return found


def missing_in(root: Path, image_env: dict[str, str], command: list[str]) -> str | None:
    """Why COMMAND cannot run in the image at ROOT, or None when it can."""
    path = image_env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if resolve_command(root, command[0], path) is None:
        return f"{command[0]} is not on the image's PATH ({path})"
    if Path(command[0]).name.startswith("python") and len(command) > 2 and command[1] == "-m":
        module = command[2].replace(".", "/")
        for site in root.glob("opt/chorus/lib/python3*/site-packages"):
            if (site / f"{module}.py").is_file() or (site / module / "__main__.py").is_file():
                return None
        return f"module {command[2]} is not in the image's site-packages"
    return None


def check_commands(built: dict[str, str], variants: dict | None = None) -> dict:
    """built: image name -> local ref (localhost/chorus-tts:0.1.0). Chart images that are
    Chorus's (repository chorus-*) but not built here are listed as unbuilt."""
    by_chart_name = {ref.removeprefix("localhost/"): ref for ref in built.values()}
    result = {"checked": 0, "missing": [], "unbuilt": set(), "foreign": set()}
    contexts: dict[str, tuple] = {}
    try:
        for variant, values in (variants or VALUES).items():
            for where, image, command in commands(render(values)):
                # images.registry=localhost names podman's local images as they are stored.
                ref = by_chart_name.get(image.removeprefix("localhost/"))
                if ref is None:
                    repository = image.split("@")[0].rsplit(":", 1)[0].rsplit("/", 1)[-1]
                    (result["unbuilt"] if repository.startswith("chorus") else result["foreign"]).add(image)
                    continue
                if ref not in contexts:
                    manager = mounted(ref)
                    contexts[ref] = (manager, manager.__enter__(), env(ref))
                _, root, image_env = contexts[ref]
                why = missing_in(root, image_env, command)
                result["checked"] += 1
                if why:
                    result["missing"].append(f"{variant}: {where} ({image}): {why}")
    finally:
        for manager, _, _ in contexts.values():
            manager.__exit__(None, None, None)
    result["unbuilt"], result["foreign"] = sorted(result["unbuilt"]), sorted(result["foreign"])
    return result
