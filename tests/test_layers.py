"""zarr's internals are reached through ``zarr_compat`` alone (import-linter's contracts in
pyproject.toml check the layers, but cannot see below an outside package's top level)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = ("zarr.core", "zarr.storage._")


def private_zarr_imports(source: str) -> set[str]:
    """The modules under zarr's internals that ``source`` imports (at any depth)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and \
            node.level == 0 else []
        out |= {n for n in names if n.startswith(PRIVATE)}
    return out


def test_zarr_internals_only_in_zarr_compat():
    found = {}
    for path in sorted((ROOT / "sparsestore").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "sparsestore/zarr_compat.py":
            continue
        names = private_zarr_imports(path.read_text())
        if names:
            found[rel] = names
    assert found == {}


def test_the_scan_sees_nested_and_from_imports():
    src = "def f():\n    from zarr.core.sync import sync\n    import zarr.storage._local\n"
    assert private_zarr_imports(src) == {"zarr.core.sync", "zarr.storage._local"}
    assert private_zarr_imports("import zarr\nfrom zarr.storage import LocalStore\n") == set()
