"""House rules that a formatter does not check: no function in model/ or pipeline/ is longer
than 60 lines (ruff caps the complexity, this the length)."""

from __future__ import annotations

import ast

from helpers import REPO

MAX_LINES = 60


def function_lengths():
    for root in ("model", "pipeline"):
        for path in sorted((REPO / root).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    name = f"{path.relative_to(REPO).as_posix()}::{node.name}"
                    yield name, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_60_lines():
    lengths = list(function_lengths())
    over = {name: n for name, n in lengths if n > MAX_LINES}
    assert not over, f"functions over {MAX_LINES} lines (cut them into named steps): {over}"
