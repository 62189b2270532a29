"""The package's shape (docs/design.md): no import cycles, small modules, parts passed in rather than patched."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mv2batch"
MAX_MODULE_LINES = 350


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that a module imports anywhere in its body (lazy imports in functions too: a cycle
    through them is a cycle of the design all the same)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return {module for module in found if module in known and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return path[path.index(child):] + [child] if child in path else [node, child]
            if child not in state:
                cycle = visit(child, path + [child])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_relative_lazy_and_package_imports():
    graph = import_graph()
    assert "mv2batch.engines" in graph["mv2batch"]  # a lazy import inside run()
    assert "mv2batch.runner.shards" in graph["mv2batch.engines.local"]  # from mv2batch.runner import shards
    assert "mv2batch.cli.options" in graph["mv2batch.cli.app"]  # from mv2batch.cli import options as o


# Which folder may import which (docs/design.md, "Import rules"): each layer imports only the layers before it,
# never one beside it or after it. The foundation is the package's top modules (errors, config, storage).
LAYERS = [
    {"foundation"},
    {"inputs", "out"},
    {"loading"},
    {"model"},
    {"tasks"},
    {"report"},
    {"dedup", "filter", "runner"},
    {"engines"},
    {"cli"},
]
FOUNDATION = {"mv2batch.errors", "mv2batch.config", "mv2batch.storage"}


def folder_of(module: str) -> str | None:
    """The sub-package a module lives in, 'foundation' for the top modules, None for the package's entry points."""
    if module in FOUNDATION:
        return "foundation"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else None


def layer_of(folder: str) -> int:
    return next(number for number, layer in enumerate(LAYERS) if folder in layer)


def rule_breaks(graph: dict[str, set[str]]) -> list[str]:
    breaks = []
    for module, imported in sorted(graph.items()):
        here = folder_of(module)
        for other in sorted(imported):
            there = folder_of(other)
            if here is None or there is None or here == there:
                continue
            if layer_of(there) >= layer_of(here):
                breaks.append(f"{module} ({here}) imports {other} ({there})")
    return breaks


def test_the_rule_finder_sees_a_break():
    assert rule_breaks({"mv2batch.inputs.tars": {"mv2batch.model.device"}}) == [
        "mv2batch.inputs.tars (inputs) imports mv2batch.model.device (model)"]
    assert rule_breaks({"mv2batch.inputs.tars": {"mv2batch.out.rundir"}})  # beside it: out and inputs are apart
    assert rule_breaks({"mv2batch.model.device": {"mv2batch.loading.preprocess"}}) == []


def test_each_folder_imports_only_the_layers_before_it():
    assert rule_breaks(import_graph()) == []


def test_every_folder_has_a_layer_and_says_what_it_owns():
    folders = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert len(folders) >= 5 and folders <= set().union(*LAYERS)
    for folder in folders:
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) <= 2, folder
    top = [path.name for path in PACKAGE.glob("*.py")]
    assert len(top) <= 12, top


def test_no_module_imports_itself_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_runner_never_imports_an_engine():
    graph = import_graph()
    runner = {m for name, imported in graph.items() if name.startswith("mv2batch.runner") for m in imported}
    assert "mv2batch.out.rundir" in runner  # the test sees the runner's imports
    assert not {m for m in runner if m.startswith("mv2batch.engines")}


def test_every_module_is_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    long = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not long, f"over {MAX_MODULE_LINES} lines: {long}"


def _mv2batch_names(tree: ast.AST) -> set[str]:
    """Local names bound to mv2batch modules or objects (import mv2batch.x as y, from mv2batch import x)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("mv2batch")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mv2batch"):
            names |= {a.asname or a.name for a in node.names}
    return names


def _root_name(node: ast.AST) -> str | None:
    """The name an attribute chain starts from (device.PixelStage -> device)."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def package_patches(source: str) -> list[str]:
    """Where a test or benchmark replaces a name of the package: setattr / monkeypatch.setattr on an object
    imported from mv2batch (a module, a class) or on a dotted 'mv2batch.x.y' target, or an assignment to an
    attribute of one. Patching os, torch or huggingface_hub's constants stays allowed: those are not ours."""
    tree = ast.parse(source)
    ours = _mv2batch_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "setattr":
            first = node.args[0] if node.args else None
            text = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else ""
            if text.startswith("mv2batch") or (first is not None and _root_name(first) in ours):
                found.append(f"line {node.lineno}: setattr {ast.unparse(node.args[0])}, ...")
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and _root_name(target.value) in ours:
                found.append(f"line {node.lineno}: {ast.unparse(target)} = ...")
    return found


def test_the_patch_finder_sees_each_form():
    source = ("from mv2batch import runner\nimport mv2batch.model.speedups as speed\n"
              "from mv2batch.model import device\nimport os\n"
              "def test(monkeypatch):\n"
              "    monkeypatch.setattr(runner, 'queued', lambda ctx: True)\n"
              "    monkeypatch.setattr('mv2batch.runner.shards.prepare', None)\n"
              "    monkeypatch.setattr(device.PixelStage, '__call__', None)\n"
              "    runner.prepare = None\n"
              "    speed.LIMIT = 2\n"
              "    monkeypatch.setattr(os, 'cpu_count', lambda: 2)\n"
              "    os.environ = {}\n")
    assert len(package_patches(source)) == 5


def test_no_test_or_benchmark_patches_the_package():
    root = PACKAGE.parent
    found = {str(path.relative_to(root)): hits for path in sorted([*root.glob("tests/**/*.py"),
                                                                   *root.glob("benchmarks/*.py")])
             if (hits := package_patches(path.read_text()))}
    assert not found, found
