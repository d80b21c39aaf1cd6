"""The import graph of ldmrt/, export/ and kernels/ (installed as ldmrt, ldmrt.export, ldmrt.kernels) has no
cycle, counting imports inside functions too: layers point down only. The package root is the public face
at the top, so no module inside imports it, and errors.py, the bottom, imports nothing of ldmrt."""
import ast

from helpers import ROOT

EXTENSIONS = {"ldmrt._C"}  # compiled modules: leaves of the graph
PACKAGES = {"ldmrt": ROOT / "ldmrt", "ldmrt.export": ROOT / "export", "ldmrt.kernels": ROOT / "kernels"}


def modules() -> dict[str, tuple]:
    """{module name: (path, is_package)}."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join((package, *(parts[:-1] if is_package else parts)))
            found[name] = (path, is_package)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, (path, is_package) in mods.items():
        base = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                origin = base
                for _ in range(node.level - 1):
                    origin = origin.rpartition(".")[0]
                module = node.module if node.level == 0 else ".".join(p for p in (origin, node.module) if p)
                # `from pkg import name` is an edge to pkg.name when that is a module, else to pkg
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods or f"{module}.{a.name}" in EXTENSIONS
                           else module for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in mods and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_walked():
    graph = import_graph()
    assert {"ldmrt.engine", "ldmrt.backends.onnxruntime", "ldmrt.export.tensorrt", "ldmrt.kernels.attention"} <= set(graph)
    assert "ldmrt.manifest" in graph["ldmrt.engine"] and "ldmrt.export.trt" in graph["ldmrt.backends.tensorrt"]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_cycle_detection_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_imports_the_package_root_and_errors_import_nothing():
    graph = import_graph()
    assert [m for m, edges in graph.items() if "ldmrt" in edges] == []
    assert graph["ldmrt.errors"] == set()
