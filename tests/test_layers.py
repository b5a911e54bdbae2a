"""The packages form layers that point one way, with no import cycles between files.

Layers, lowest first: core < data < features < head < sweeps < evaluation < finetuning < serving
< (fitting, fitstate, fit_settings, demo) < api < cli, and `dogtl/__init__.py`, `dogtl/__main__.py` on top. A module
imports only from its own layer or lower ones, so each stage can be read, tested and changed
knowing only what lies below it. Every import counts, also those inside functions (they hide
cycles, not remove them), and a function-local import of a dogtl module needs a `# local: <reason>`
comment on its line or the line above (or above its block of imports): most exist to keep
`dogtl --help` from loading TensorFlow, and the reason tells the next reader which.

`python tests/test_layers.py` prints every finding, grouped by file.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first; modules of one entry are on the same layer and may import each other.
LAYERS = [("core",), ("data",), ("features",), ("head",), ("sweeps",), ("evaluation",), ("finetuning",),
          ("serving",), ("fitting", "fitstate", "fit_settings", "demo", "demo_settings"), ("api",), ("cli",), ("__init__", "__main__")]

# Third-party modules that may be imported inside functions without a comment, for one of two
# reasons. Heavy ones take long to import (or pull TensorFlow in): importing them in the function
# that needs them keeps `dogtl --help`, argument checks and light commands fast. Optional ones
# belong to an extra (serving, bot, sweeps on a cluster, TFLite, ...) or a Python version and may
# be missing: importing them where used lets everything else run without them. Any other local
# import (the standard library, light modules) buys nothing and belongs at the top.
HEAVY = frozenset({
    "tensorflow", "keras", "h5py", "sklearn", "pandas", "matplotlib", "scipy", "numpy", "onnx",
    "onnxruntime", "openvino", "tf2onnx", "tf_keras", "optuna", "mlflow", "fastapi", "uvicorn",
    "starlette", "httpx", "telegram", "PIL", "selenium", "dask", "distributed", "joblib", "rich",
    "typer", "psutil", "tensorboard", "tensorflow_datasets", "kaggle", "yaml",
})
OPTIONAL = frozenset({
    "sqlalchemy", "python_multipart", "aiolimiter", "ai_edge_litert", "tomli_w", "tomllib",
})


@dataclass(frozen=True)
class Import:
    source: str       # importing module, e.g. "dogtl.head.train"
    target: str       # imported dogtl module (a file), e.g. "dogtl.core.files"
    path: Path
    line: int
    local: bool       # inside a function
    commented: bool   # has a `# local:` comment

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer(module: str, package: str) -> int:
    """The layer of a module of `package`: the index in LAYERS of its first name below the package."""
    parts = module.split(".")
    first = parts[1] if len(parts) > 1 else "__init__"
    for rank, names in enumerate(LAYERS):
        if first in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _in_function(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return True
    return False


def _commented(node: ast.AST, lines: list[str], import_lines: set[int]) -> bool:
    """`# local:` on the import's lines, or above it, past any imports stacked directly above."""
    if any("# local:" in lines[n - 1] for n in range(node.lineno, node.end_lineno + 1)):
        return True
    n = node.lineno - 1
    while n >= 1:
        if "# local:" in lines[n - 1]:
            return True
        if n not in import_lines:
            return False
        n -= 1
    return False


def _targets(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> list[tuple[str, str]]:
    """(imported name as written, the module file it runs) for each name an import statement brings in."""
    def file_of(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        return [(a.name, file_of(a.name)) for a in node.names]
    if node.level:
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[:len(base) - (node.level - 1)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module
    # `from pkg import name` runs pkg.name when it is a module, else pkg itself
    return [(origin, file_of(f"{origin}.{a.name}") if f"{origin}.{a.name}" in modules else file_of(origin))
            for a in node.names]


def scan(root: Path, package: str = "dogtl") -> tuple[list[Import], list[tuple[str, Path, int, bool]]]:
    """Every import of a module of `package` by a module of it, and every function-local import of any other module."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    modules = set(files)
    found, outside = [], []
    for module, path in files.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text, filename=str(path))
        parents = _parents(tree)
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        import_lines = {n for node in imports for n in range(node.lineno, node.end_lineno + 1)}
        for node in imports:
            local = _in_function(node, parents)
            commented = local and _commented(node, lines, import_lines)
            for written, target in _targets(node, module, path.name == "__init__.py", modules):
                if target is not None:
                    if target != module:
                        found.append(Import(module, target, path, node.lineno, local, commented))
                elif local:
                    top = written.split(".")[0]
                    outside.append((top, path, node.lineno, top in HEAVY | OPTIONAL or commented))
    return list(dict.fromkeys(found)), list(dict.fromkeys(outside))


def upward(imports: list[Import], package: str = "dogtl") -> list[Import]:
    return [i for i in imports if layer(i.target, package) > layer(i.source, package)]


def cycles(imports: list[Import]) -> list[list[str]]:
    """The strongly connected components with more than one file (Tarjan's algorithm)."""
    graph = defaultdict(set)
    for i in imports:
        graph[i.source].add(i.target)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(list(graph)):
        if v not in index:
            visit(v)
    return found


def cycle_edges(component: list[str], imports: list[Import], root: Path) -> list[str]:
    members = set(component)
    return [f"{i.where(root)} {i.source} -> {i.target}" for i in imports
            if i.source in members and i.target in members]


def uncommented_local(imports: list[Import]) -> list[Import]:
    seen, found = set(), []
    for i in imports:
        if i.local and not i.commented and (i.path, i.line) not in seen:
            seen.add((i.path, i.line))
            found.append(i)
    return found


def findings(root: Path, package: str = "dogtl") -> dict[str, list[str]]:
    imports, outside = scan(root, package)
    return {
        "imports from a lower layer to a higher one": [
            f"{i.where(root)} {i.source} -> {i.target}" for i in upward(imports, package)],
        "import cycles between files": [
            " | ".join(cycle_edges(c, imports, root)) for c in cycles(imports)],
        "function-local imports of dogtl modules without a `# local: <reason>` comment": [
            f"{i.where(root)} {i.source} -> {i.target}" for i in uncommented_local(imports)],
        "function-local imports of light modules without a `# local: <reason>` comment": [
            f"{path.relative_to(root)}:{line} {name}" for name, path, line, ok in outside if not ok],
    }


def _report(found: dict[str, list[str]]) -> str:
    return "\n".join(f"{kind} ({len(items)}):\n  " + "\n  ".join(items) for kind, items in found.items() if items)


def _check(kind: str) -> None:
    found = findings(SRC)[kind]
    assert not found, _report({kind: found})


def test_layers_point_one_way():
    _check("imports from a lower layer to a higher one")


def test_no_import_cycles_between_files():
    _check("import cycles between files")


def test_local_imports_of_dogtl_modules_say_why():
    _check("function-local imports of dogtl modules without a `# local: <reason>` comment")


def test_light_modules_are_imported_at_the_top():
    _check("function-local imports of light modules without a `# local: <reason>` comment")


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "dogtl" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_checker_finds_upward_imports_cycles_and_silent_local_imports(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "", "core/__init__.py": "", "head/__init__.py": "", "cli/__init__.py": "",
        "core/a.py": "def f():\n    from ..head import x  # an upward import, hidden in a function\n",
        "head/x.py": "from . import y\nimport dogtl.core.a\n",
        "head/y.py": "from dogtl.head.x import thing\n",
        "cli/z.py": ("def f():\n    # local: the reason\n    import dogtl.head.x\n    from dogtl.core import a\n"
                     "    import tensorflow\n\n\ndef g():\n    import json\n    from dogtl.core import a\n"),
    })
    found = findings(root)
    assert found["imports from a lower layer to a higher one"] == ["dogtl/core/a.py:2 dogtl.core.a -> dogtl.head.x"]
    assert found["import cycles between files"] == [
        "dogtl/core/a.py:2 dogtl.core.a -> dogtl.head.x | dogtl/head/x.py:1 dogtl.head.x -> dogtl.head.y"
        " | dogtl/head/x.py:2 dogtl.head.x -> dogtl.core.a | dogtl/head/y.py:1 dogtl.head.y -> dogtl.head.x"]
    assert found["function-local imports of dogtl modules without a `# local: <reason>` comment"] == [
        "dogtl/cli/z.py:10 dogtl.cli.z -> dogtl.core.a", "dogtl/core/a.py:2 dogtl.core.a -> dogtl.head.x"]
    assert found["function-local imports of light modules without a `# local: <reason>` comment"] == [
        "dogtl/cli/z.py:9 json"]


def test_the_checker_finds_a_two_file_cycle(tmp_path):
    root = _tree(tmp_path, {"__init__.py": "", "core/__init__.py": "",
                            "core/a.py": "from dogtl.core.b import x\n", "core/b.py": "from . import a\n"})
    found = findings(root)
    assert found["import cycles between files"] == [
        "dogtl/core/a.py:1 dogtl.core.a -> dogtl.core.b | dogtl/core/b.py:1 dogtl.core.b -> dogtl.core.a"]
    assert not found["imports from a lower layer to a higher one"]


if __name__ == "__main__":
    found = findings(SRC)
    for kind, items in found.items():
        print(f"== {kind}: {len(items)}")
        by_file = defaultdict(list)
        for item in items:
            by_file[item.split(":")[0]].append(item)
        for file, rows in sorted(by_file.items()):
            print(f"  {file}: {len(rows)}")
            for row in rows:
                print(f"    {row}")
