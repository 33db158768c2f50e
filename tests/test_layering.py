"""The layering rules, read from the imports of every module in the tree.

- The engines import no gRPC: the token engine and its scheduler, the streaming decoder
  and the decode engine know nothing of the RPC layer that adapts requests to them.
- The gateway imports neither torch nor llama.cpp (its image ships without them).
- The services and the gateway never import each other.
- The shared package (`chorus/`) imports no service, no gateway and no tool.

Imports are read with `ast`, so nothing is imported to check them, and an import
inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("chorus", "services", "gateway", "tools")

ENGINE_MODULES = (
    "services/token_server/engine.py",
    "services/token_server/scheduler.py",
    "services/codec_worker/streaming_decoder.py",
    "services/codec_worker/decode_engine.py",
)
PARTS = {  # a part and the module prefixes that belong to it
    "token_server": ("services.token_server",),
    "codec_worker": ("services.codec_worker",),
    "gateway": ("gateway",),
    "chorus": ("chorus",),
    "tools": ("tools",),
}


def imports_of(source: str, module: str = "") -> set[str]:
    """Every module name `source` imports (relative imports resolved against `module`)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.rsplit(".", node.level)[0]
                base = f"{package}.{base}" if base else package
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def part_of(module: str) -> str | None:
    for part, prefixes in PARTS.items():
        if any(_within(module, p) for p in prefixes):
            return part
    return None


def violations(path: str, source: str) -> list[str]:
    """The rules `source` (the module at `path`, relative to the root) breaks."""
    module = path[:-3].replace("/", ".").removesuffix(".__init__")
    found = []
    names = imports_of(source, module)
    part = part_of(module)
    if path in ENGINE_MODULES:
        found += [f"{path} imports {n}: engines import no gRPC" for n in names if _within(n, "grpc")]
    if part == "gateway":
        found += [f"{path} imports {n}: the gateway ships without torch and llama.cpp"
                  for n in names if any(_within(n, p) for p in ("torch", "llama_cpp", "snac"))]
    if part in ("token_server", "codec_worker", "gateway"):
        others = {"token_server", "codec_worker", "gateway", "tools"} - {part}
        found += [f"{path} imports {n}: services and the gateway never import each other (or the tools)"
                  for n in names if part_of(n) in others]
    if part == "chorus":
        found += [f"{path} imports {n}: the shared package imports no service, gateway or tool"
                  for n in names if part_of(n) in ("token_server", "codec_worker", "gateway", "tools")]
    return found


def tree_modules() -> list[tuple[str, str]]:
    modules = []
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            relative = file.relative_to(ROOT).as_posix()
            if "/proto/" not in relative:  # generated stubs
                modules.append((relative, file.read_text()))
    return modules


def test_the_tree_keeps_every_layering_rule():
    modules = tree_modules()
    assert any(path == "services/token_server/engine.py" for path, _ in modules)
    broken = [v for path, source in modules for v in violations(path, source)]
    assert broken == []


@pytest.mark.parametrize(
    "path, bad_import, rule",
    [
        ("services/token_server/engine.py", "import grpc", "engines import no gRPC"),
        ("services/codec_worker/decode_engine.py", "from grpc import aio", "engines import no gRPC"),
        ("gateway/pipeline.py", "import torch", "without torch"),
        ("gateway/router.py", "from services.token_server.engine import Engine", "never import each other"),
        ("services/codec_worker/server.py", "from gateway.errors import GatewayError", "never import each other"),
        ("services/token_server/servicer.py", "from ..codec_worker import model", "never import each other"),
        ("chorus/client.py", "from gateway.audio_formats import FORMATS", "shared package imports no"),
        ("chorus/serving.py", "def f():\n    import tools.supervisor", "shared package imports no"),
    ],
)
def test_a_deliberately_bad_import_is_caught(path, bad_import, rule):
    """The checker itself: each rule flags a module that breaks it."""
    found = violations(path, f'"""A module."""\n\nimport json\n{bad_import}\n')
    assert found and all(rule in v for v in found)
    assert violations(path, '"""A module."""\n\nimport json\nfrom chorus import orpheus\n') == []
