"""The package's import graph has no cycle: every module can be read knowing only those it imports.

The graph is read from the source (every ``import`` statement, including those inside functions),
not from a running interpreter, so lazy imports count too.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moei2"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {"moei2._core": set()}  # the compiled core imports nothing of the package
    files["moei2._core"] = None
    for name, path in files.items():
        if path is None:
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets.update(f"{base}.{a.name}" for a in node.names)
        deps = set()
        for target in targets:
            while target not in files and "." in target:  # a name imported from a module
                target = target.rpartition(".")[0]
            if target in files and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def find_cycle(graph: dict):
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return trail[trail.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, trail + [dep])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_the_import_graph_is_read_from_the_source():
    graph = import_graph()
    assert "moei2.stages.selection" in graph["moei2.stages"]
    assert "moei2.config" in graph["moei2.pipeline"]


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_a_cycle_would_be_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
