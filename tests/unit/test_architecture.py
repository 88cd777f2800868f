"""The layout rules of docs/ARCHITECTURE.md, checked on the source tree.

No two packages of ``megatron_ext`` import each other (counting every import statement,
lazy ones inside functions included), and no source file of the project is over 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron_ext"
MAX_LINES = 500


def _package_imports() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        source = parts[0] if len(parts) > 1 else path.stem
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                target = name.split(".")[1] if name.startswith("megatron_ext.") else None
                if target and target != source:
                    edges.setdefault(source, set()).add(target)
    return edges


def test_no_two_megatron_ext_packages_import_each_other():
    edges = _package_imports()
    assert len(edges) > 5  # the walk found the packages
    circles = sorted(
        f"{a}<->{b}" for a in edges for b in edges[a] if a < b and a in edges.get(b, ())
    )
    assert not circles, f"packages importing each other: {circles}"


def test_no_source_file_is_over_500_lines():
    roots = ("megatron_ext", "recipes", "launch", "tests", "bench")
    long = {
        str(p.relative_to(ROOT)): n
        for r in roots
        for p in (ROOT / r).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these by concern: {long}"
