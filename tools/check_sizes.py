"""`make lint`'s size check: modules of dyrate_ext/ over 400 lines and functions over 80
lines (docstrings aside) fail, unless their docstring gives the reason in a line starting
"Size:".

    python tools/check_sizes.py [ROOT ...]     (default: dyrate_ext)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE = 400
MAX_FUNCTION = 80


def _docstring_lines(node: ast.AST) -> tuple[int, str]:
    """(lines taken by the docstring of node, its text) or (0, "")."""
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        value = body[0].value.value
        if isinstance(value, str):
            return body[0].end_lineno - body[0].lineno + 1, value
    return 0, ""


def _excused(doc: str) -> bool:
    return any(line.strip().startswith("Size:") for line in doc.splitlines())


def check(path: Path) -> list[str]:
    """The size problems of one Python file."""
    text = path.read_text()
    tree = ast.parse(text)
    problems = []
    lines = len(text.splitlines())
    if lines > MAX_MODULE and not _excused(_docstring_lines(tree)[1]):
        problems.append(f"{path}: {lines} lines (max {MAX_MODULE})")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc_len, doc = _docstring_lines(node)
            length = node.end_lineno - node.lineno + 1 - doc_len
            if length > MAX_FUNCTION and not _excused(doc):
                problems.append(
                    f"{path}:{node.lineno}: {node.name} has {length} lines (max {MAX_FUNCTION})"
                )
    return problems


def main(argv: list[str] | None = None) -> int:
    roots = [Path(a) for a in (argv if argv is not None else sys.argv[1:])] or [Path("dyrate_ext")]
    problems = [p for root in roots for f in sorted(root.rglob("*.py")) for p in check(f)]
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
