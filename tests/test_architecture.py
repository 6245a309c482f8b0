"""The tree's promises: the core imports no Dagster and nothing above it, and no module or room
imports its way back to itself (docs/how-it-works.md describes the rooms)."""

import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "laion_dagster"
CORE = "laion_dagster.core"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every module named by an import anywhere in the file (lazy imports too)."""
    named = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            named.add(node.module)
            named.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
    return named


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def _room(module: str) -> str:
    """core's rooms (core.input, core.queue, ...) and its shared modules (core.settings, ...),
    and the package's other parts (worker, defs, demo, cli, ...)."""
    parts = module.split(".") + [""]
    return ".".join(parts[:3]) if parts[1] == "core" and parts[2] else parts[1]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if not state.get(nxt) and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if not state.get(start) and (found := visit(start, [])):
            return found
    return None


def test_the_core_imports_no_dagster_and_nothing_above_it():
    for name, path in _modules().items():
        if not name.startswith(CORE):
            continue
        for imported in _imports(path):
            top = imported.split(".")[0]
            assert top != "dagster" and not imported.startswith("dagster_"), (name, imported)
            if top == "laion_dagster":
                assert imported.startswith(CORE), f"{name} imports {imported}, above the core"


def test_no_module_imports_its_way_back_to_itself():
    assert _cycle(_graph()) is None


def test_the_rooms_form_layers():
    rooms = collections.defaultdict(set)
    for name, imported in _graph().items():
        rooms[_room(name)].update(_room(m) for m in imported if _room(m) != _room(name))
    assert _cycle(rooms) is None
    # Control ties the other rooms together: none of them reaches back into it.
    assert all(f"{CORE}.control" not in rooms[r] for r in rooms if r.startswith(CORE)
               and r != f"{CORE}.control")
