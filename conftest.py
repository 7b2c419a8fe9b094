"""README.md's code runs as tests (sybil): every ```python and ```bash block, in order.

One document is one sybil namespace, so the blocks run top to bottom as a reader pastes
them into one session.  They run in a fresh temporary directory (the working directory
while README.md's examples run) that already holds the input files the command-line block
converts (``shards/*.npz``, ``data.mtx.gz``), so the README runs twice in a row and never
touches the checkout.  A ```bash block runs under ``bash -eo pipefail`` with this
interpreter's ``bin`` first on ``PATH`` (``sparsestore``, ``python``) and this checkout
first on ``PYTHONPATH``; each command must exit 0.

Blocks that use TensorFlow/Keras get the ``tf`` marker; those that use JAX or PyTorch
are skipped where the framework is not installed (``make test-backends`` installs
both and runs README.md again).  A block that cannot run here (it installs, or needs a
process of its own) carries ``<!-- skip: next "why" -->`` in README.md.

    .venv/bin/python -m pytest README.md
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
from sybil import Example, Sybil
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.markdown import CodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent
BASH_TIMEOUT_S = 300

# What a block needs, from what it imports; checked on its source.
_NEEDS = {
    "tf": re.compile(r"\b(tensorflow|keras|sstf)\b"),
    "jax": re.compile(r"\b(adapters\.jax|import jax|ssjax)\b"),
    "torch": re.compile(r"\b(adapters\.torch|import torch|sstorch)\b"),
}


def write_inputs(where: Path) -> None:
    """The files README.md's command-line block converts: three .npz shards, a .mtx.gz."""
    rng = np.random.default_rng(0)
    (where / "shards").mkdir()
    for i in range(3):
        part = sp.random(500, 300, density=0.02, format="csr", dtype=np.float32, rng=rng)
        sp.save_npz(where / "shards" / f"part{i}.npz", part)
    with gzip.open(where / "data.mtx.gz", "wb") as f:
        scipy.io.mmwrite(f, sp.random(400, 200, density=0.03, format="coo", rng=rng))


def setup_document(namespace: dict[str, Any]) -> None:
    """Run the document in a new temporary directory holding the inputs."""
    work = Path(tempfile.mkdtemp(prefix="readme-"))
    write_inputs(work)
    namespace["__readme_dirs__"] = (os.getcwd(), work)
    os.chdir(work)


def teardown_document(namespace: dict[str, Any]) -> None:
    old, work = namespace.pop("__readme_dirs__")
    os.chdir(old)
    shutil.rmtree(work, ignore_errors=True)


_python = PythonEvaluator()


def run_python(example: Example) -> None:
    """Run one ```python block in the document's namespace, unless it needs JAX or PyTorch
    and that is not installed (a skip raised here, after sybil's own skip directives)."""
    for name in ("jax", "torch"):
        if _NEEDS[name].search(example.parsed) and importlib.util.find_spec(name) is None:
            raise unittest.SkipTest(f"{name} is not installed (make test-backends installs it)")
    _python(example)


def run_bash(example: Example) -> None:
    """Run one ```bash block; a failing command fails the test with its output."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run(["bash", "-eo", "pipefail", "-c", example.parsed],
                         capture_output=True, text=True, env=env, timeout=BASH_TIMEOUT_S)
    if out.returncode != 0:
        raise AssertionError(
            f"README.md line {example.line}: bash exited {out.returncode}\n"
            f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
        )


pytest_collect_file = Sybil(
    parsers=[CodeBlockParser(language="python", evaluator=run_python),
             CodeBlockParser(language="bash", evaluator=run_bash), SkipParser()],
    filenames=["README.md"],
    setup=setup_document,
    teardown=teardown_document,
).pytest()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give README blocks that use TensorFlow or Keras the ``tf`` marker."""
    for item in items:
        source = getattr(getattr(item, "example", None), "parsed", None)
        if isinstance(source, str) and item.path.name == "README.md" \
                and _NEEDS["tf"].search(source):
            item.add_marker(pytest.mark.tf)
