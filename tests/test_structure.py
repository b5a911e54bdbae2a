"""Size limits on src/dogtl: no module over 400 lines, no function over 60.

A long function may stay long when it says why: a ``# long: <reason>`` comment on the
line above its ``def`` (above its decorators too) or on its first body line. Modules have
no such escape: split them by concern.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dogtl"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _has_reason(lines, node):
    """A ``# long:`` comment above the def (or its decorators) or before its first statement."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # a comment after the docstring counts as the first body line
    candidates = [first - 1] + list(range(node.lineno, body[0].lineno))
    return any(1 <= n <= len(lines) and lines[n - 1].strip().startswith("# long:")
               for n in candidates)


def violations(root):
    """Every module over the line limit and every unexplained long function under root."""
    found = []
    for path in sorted(Path(root).rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        name = path.relative_to(root).as_posix()
        if len(lines) > MAX_MODULE_LINES:
            found.append(f"{name}: {len(lines)} lines (limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and not _has_reason(lines, node):
                found.append(f"{name}:{node.lineno} {node.name}(): {length} lines "
                             f"(limit {MAX_FUNCTION_LINES}; or say why in a '# long:' comment)")
    return found


def test_source_tree_within_size_limits():
    found = violations(SRC)
    assert not found, "over the size limits:\n" + "\n".join(found)


def _function(name, body_lines, comment=None, where="above"):
    head = [f"# long: {comment}"] if comment and where == "above" else []
    body = [f"    # long: {comment}"] if comment and where == "body" else []
    body += [f"    x{i} = {i}" for i in range(body_lines)]
    return "\n".join(head + [f"def {name}():"] + body) + "\n"


def test_checker_names_long_modules_and_functions(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "big.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    (tmp_path / "pkg" / "ok.py").write_text(_function("short", 10))
    (tmp_path / "pkg" / "long.py").write_text(_function("sprawling", MAX_FUNCTION_LINES))
    found = violations(tmp_path)
    assert len(found) == 2, found
    assert found[0].startswith("pkg/big.py: 401 lines")
    assert found[1].startswith("pkg/long.py:1 sprawling(): 61 lines")


def test_checker_accepts_a_stated_reason(tmp_path):
    (tmp_path / "above.py").write_text(_function("f", MAX_FUNCTION_LINES, "one table", "above"))
    (tmp_path / "body.py").write_text(_function("g", MAX_FUNCTION_LINES, "one table", "body"))
    decorated = "import functools\n\n# long: one table\n@functools.cache\n" + \
        _function("h", MAX_FUNCTION_LINES)
    (tmp_path / "decorated.py").write_text(decorated)
    assert violations(tmp_path) == []
