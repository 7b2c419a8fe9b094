"""The distribution installs one top-level name, ``sparsestore``; the framework backends in
the repository's ``adapters/`` folder install as ``sparsestore.adapters`` (PyPI's
``adapters`` is AdapterHub's project: a second top-level ``adapters`` would overwrite it)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_backends_import_under_sparsestore():
    import sparsestore.adapters as pkg

    assert Path(pkg.__file__).resolve().parent == ROOT / "adapters"


def test_every_package_directory_is_listed():
    """pyproject lists packages by name (one of them lives elsewhere): a new subpackage of
    sparsestore that is not listed would be left out of the wheel."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "sparsestore").rglob("__init__.py")}
    assert found | {"sparsestore.adapters"} == listed
    assert conf["package-dir"] == {"sparsestore.adapters": "adapters"}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
    return out


def test_nothing_imports_a_top_level_adapters_package():
    files = [p for d in ("sparsestore", "adapters", "tests", "examples", "benchmarks")
             for p in (ROOT / d).rglob("*.py")] + [ROOT / "conftest.py"]
    bad = [f"{p.relative_to(ROOT)}: {name}" for p in files for name in _imports(p)
           if name == "adapters" or name.startswith("adapters.")]
    assert not bad


def test_the_detector_sees_a_top_level_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import adapters.tensorflow as t\nfrom adapters import jax\n")
    assert _imports(f) == ["adapters.tensorflow", "adapters"]


@pytest.mark.timeout(300)
def test_the_wheel_holds_only_sparsestore(tmp_path):
    """Built as pip would (no isolation: this environment's setuptools), the wheel's files
    all sit under sparsestore/ (adapters included) and its entry points name them there."""
    src = tmp_path / "src"  # a copy: the build writes build/ and egg-info beside its sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("sparsestore", "adapters"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(src)],
        capture_output=True, text=True, check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("sparsestore-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        eps = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"sparsestore"}
    assert {"sparsestore/adapters/tensorflow.py", "sparsestore/adapters/_tf_plan.py",
            "sparsestore/adapters/_tf_passes.py", "sparsestore/adapters/_tf_errors.py",
            "sparsestore/adapters/jax.py", "sparsestore/adapters/torch.py"} <= set(names)
    assert "tensorflow = sparsestore.adapters.tensorflow:TensorFlowBackend" in eps
