"""The layering rules, read from the imports of every module in the tree.

- The engines import no gRPC: the token engine and its scheduler, the streaming decoder
  and the decode engine know nothing of the RPC layer that adapts requests to them.
- The gateway imports neither torch nor llama.cpp (its image ships without them).
- The services and the gateway never import each other.
- The shared package (`chorus/`) imports no service, no gateway and no tool.
- No import cycle inside `chorus/`: its modules import one another in one direction
  only, so any of them can be imported first (leaf modules such as `chorus.rpc.errors`
  and `chorus.telemetry.tiers` hold what two rooms both need).

Imports are read with `ast`, so nothing is imported to check them, and an import
inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("chorus", "services", "gateway", "tools")

ENGINE_MODULES = (
    "services/token_server/engine.py",
    "services/token_server/scheduler.py",
    "services/token_server/request.py",
    "services/token_server/request_mapping.py",
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
    module = module_name(path)
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


def module_name(path: str) -> str:
    """`chorus/rpc/serving.py` -> `chorus.rpc.serving`; a package's `__init__.py` is the package."""
    return path[:-3].replace("/", ".").removesuffix(".__init__")


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the modules among `sources` (name -> source) it imports, at the top or in a
    function alike. An imported name resolves to the longest of those modules it lies in
    (`from chorus.rpc.serving import new_server` is an edge to `chorus.rpc.serving`)."""
    graph: dict[str, set[str]] = {}
    for module, source in sources.items():
        edges = set()
        for name in imports_of(source, module):
            parts = name.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in sources:
                    if candidate != module:
                        edges.add(candidate)
                    break
        graph[module] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of `graph` (Tarjan's algorithm) that has
    more than one module, as a path that ends where it starts: ["a", "b", "a"]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for component in components:
        if len(component) < 2:
            continue
        start = min(component)  # the shortest way from `start` back to itself, inside the component
        came_from: dict[str, str] = {}
        queue = deque([start])
        while queue:
            v = queue.popleft()
            if start in graph[v]:
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                cycles.append([*reversed(path), start])
                break
            for w in sorted(graph[v] & component):
                if w != start and w not in came_from:
                    came_from[w] = v
                    queue.append(w)
    return cycles


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
        ("chorus/rpc/serving.py", "def f():\n    import tools.supervisor", "shared package imports no"),
    ],
)
def test_a_deliberately_bad_import_is_caught(path, bad_import, rule):
    """The checker itself: each rule flags a module that breaks it."""
    found = violations(path, f'"""A module."""\n\nimport json\n{bad_import}\n')
    assert found and all(rule in v for v in found)
    assert violations(path, '"""A module."""\n\nimport json\nfrom chorus.speech import orpheus\n') == []


def test_no_import_cycle_inside_the_shared_package():
    sources = {module_name(path): source for path, source in tree_modules() if path.startswith("chorus/")}
    assert "chorus.rpc.serving" in sources and "chorus.telemetry.tracing" in sources
    graph = import_graph(sources)
    assert "chorus.telemetry.tracing" in graph["chorus.rpc.serving"]  # the graph sees real edges
    cycles = [" -> ".join(cycle) for cycle in import_cycles(graph)]
    assert cycles == [], "import cycles inside chorus/ (move what both sides need into a leaf module):\n  " + \
        "\n  ".join(cycles)


def test_an_import_cycle_is_caught():
    """The detector itself: two modules that import each other (one of them only inside a
    function) are a cycle, reported as a path; a one-way import is not."""
    sources = {
        "chorus.a": '"""A."""\n\nfrom chorus import b\n',
        "chorus.b": '"""B."""\n\ndef f():\n    from chorus.a import thing\n',
        "chorus.c": '"""C."""\n\nimport chorus.a\n',
    }
    graph = import_graph(sources)
    assert graph == {"chorus.a": {"chorus.b"}, "chorus.b": {"chorus.a"}, "chorus.c": {"chorus.a"}}
    assert import_cycles(graph) == [["chorus.a", "chorus.b", "chorus.a"]]
    sources["chorus.b"] = '"""B."""\n\nimport json\n'
    assert import_cycles(import_graph(sources)) == []
    # A longer cycle reads as the whole path.
    assert import_cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z", "x"]]


def test_readme_layout_names_every_room_and_every_module_of_chorus():
    """A newcomer finds the room for a concern from README's layout table: each room of
    chorus/ has a row, and the row names each of its modules (as `name.py` or as the
    `python -m chorus.room.name` that runs it), so a new module cannot go unlisted."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cell = re.match(r"^\| `(chorus/\w+/)` \|(.*)\|$", line)
        if cell:
            rows[cell.group(1)] = cell.group(2)
    rooms = sorted(p for p in (ROOT / "chorus").iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert len(rooms) >= 6
    missing_rooms = [f"chorus/{room.name}/" for room in rooms if f"chorus/{room.name}/" not in rows]
    assert missing_rooms == [], f"rooms without a row in README's layout table: {missing_rooms}"
    unnamed = [f"chorus/{room.name}/{module.name}" for room in rooms if room.name != "proto"
               for module in sorted(room.glob("*.py")) if module.name != "__init__.py"
               and f"`{module.name}`" not in rows[f"chorus/{room.name}/"]
               and f"chorus.{room.name}.{module.stem}`" not in rows[f"chorus/{room.name}/"]
               and module.stem not in rows[f"chorus/{room.name}/"].split()]
    assert unnamed == [], f"modules their room's row in README's layout table does not name: {unnamed}"
