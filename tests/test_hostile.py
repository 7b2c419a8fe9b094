"""Hostile input: pickles, decompression bombs, absurd sizes, shell injection and stores whose
metadata names code.  Each is refused with a clear SparseStoreError and no side effect."""

from __future__ import annotations

import ast
import io
import json
import os
import sys
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

import sparsestore
from benchmarks.forge import bomb as _bomb
from sparsestore.conversion import convert
from sparsestore.errors import (
    CorruptStoreError,
    DTypeError,
    InvalidInputError,
    LabelError,
    NotAStoreError,
    OutOfRangeError,
    SparseStoreError,
    UnsafeInputError,
)
from sparsestore.ingest.coo import from_coo
from sparsestore.validate import validate_store

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = "sparsestore_evil_payload"


class Marker:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def no_stray(tmp_path: Path, name: str) -> None:
    """Nothing at the destination, and no hidden temp dir that could pass for a store."""
    assert not (tmp_path / name).exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(f".{name}.")]


# ------------------------------------------------------------------ pickles

def test_object_arrays_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "PWNED"
    X = np.empty((2, 2), dtype=object)
    X[0, 0] = Marker(marker)
    with pytest.raises(DTypeError):
        sparsestore.save(tmp_path / "a.zarr", X)
    with pytest.raises(DTypeError):
        sparsestore.save(tmp_path / "a.zarr", np.ones((2, 2)),
                         labels={"y": np.array([Marker(marker), 1], dtype=object)})
    assert not marker.exists()
    no_stray(tmp_path, "a.zarr")


@pytest.mark.parametrize("kind", ["npy", "npz", "npz_scipy"])
def test_pickled_numpy_files_are_refused(tmp_path, kind):
    marker = tmp_path / "PWNED"
    payload = np.array([Marker(marker), 1.0], dtype=object)
    src = tmp_path / f"evil.{kind.split('_')[0]}"
    if kind == "npy":
        np.save(src, payload.reshape(1, 2), allow_pickle=True)
    elif kind == "npz":
        np.savez(src, payload.reshape(1, 2))
    else:  # a scipy save_npz layout whose data member is a pickle
        X = sp.csr_matrix(np.ones((1, 2)))
        np.savez(src, data=payload, indices=X.indices, indptr=X.indptr,
                 format=np.array("csr"), shape=np.array(X.shape))
    assert not marker.exists()
    with pytest.raises(SparseStoreError):
        convert(src, tmp_path / "out.zarr")
    assert not marker.exists(), "unpickling ran attacker code"
    no_stray(tmp_path, "out.zarr")


def test_decompression_bomb_is_refused_before_allocating(tmp_path):
    """256 MiB of zeros in a ~0.3 MB .npz against a 16 MiB limit: refused from the zip
    directory, before inflating anything."""
    src = tmp_path / "bomb.npz"
    _bomb(src, 2**28)
    assert src.stat().st_size < 2**21
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeInputError, match="decompress"):
            convert(src, tmp_path / "out.zarr", max_bytes=2**24)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**24, f"allocated {peak} bytes for a bomb"
    no_stray(tmp_path, "out.zarr")


def test_npz_member_header_lying_about_its_size_is_refused(tmp_path):
    """A member whose .npy header claims 2**40 values but holds a few bytes."""
    src = tmp_path / "liar.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (2**20, 2**20)}
    )
    with zipfile.ZipFile(src, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("arr_0.npy", header.getvalue() + bytes(64))
    tracemalloc.start()
    try:
        with pytest.raises(SparseStoreError):
            convert(src, tmp_path / "out.zarr")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**26
    no_stray(tmp_path, "out.zarr")


def test_npy_header_with_absurd_shape_is_refused(tmp_path):
    src = tmp_path / "huge.npy"
    with open(src, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (2**62, 4)}
        )
        f.write(bytes(64))
    with pytest.raises(SparseStoreError):
        convert(src, tmp_path / "out.zarr")
    no_stray(tmp_path, "out.zarr")


# -------------------------------------------------------------- absurd sizes

class FakeMatrix:
    """Claims a shape; fails loudly if anything tries to read it."""

    def __init__(self, shape):
        self.shape = shape
        self.dtype = np.dtype(np.float32)

    def __array__(self, *args, **kwargs):
        raise AssertionError("the library tried to materialise an absurd matrix")

    def __getitem__(self, key):
        raise AssertionError("the library tried to read an absurd matrix")


ABSURD = [(2**62, 3), (3, 2**62), (2**62, 2**62)]
NEGATIVE = [(-1, 3), (3, -5)]


@pytest.mark.parametrize("shape", ABSURD + NEGATIVE)
def test_save_refuses_absurd_and_negative_shapes(tmp_path, shape):
    exc = UnsafeInputError if shape in ABSURD else InvalidInputError
    with pytest.raises(exc):
        sparsestore.save(tmp_path / "a.zarr", FakeMatrix(shape))
    no_stray(tmp_path, "a.zarr")


@pytest.mark.parametrize("shape", [(2**62, 10), (10, 2**62)])
def test_save_refuses_absurd_scipy_coo(tmp_path, shape):
    X = sp.coo_matrix((np.array([1.0]), (np.array([0]), np.array([0]))), shape=shape)
    with pytest.raises(UnsafeInputError):
        sparsestore.save(tmp_path / "a.zarr", X)
    no_stray(tmp_path, "a.zarr")


@pytest.mark.parametrize("n_cols, exc", [(2**62, UnsafeInputError), (-1, InvalidInputError),
                                         (1.5, InvalidInputError), ("10", InvalidInputError),
                                         (True, InvalidInputError)])
def test_create_refuses_bad_widths(tmp_path, n_cols, exc):
    with pytest.raises(exc):
        sparsestore.create(tmp_path / "a.zarr", n_cols=n_cols)
    no_stray(tmp_path, "a.zarr")


@pytest.mark.parametrize("shape", [(2**62, 4), (-1, 4)])
def test_append_refuses_absurd_and_negative_row_counts(tmp_path, shape):
    store = sparsestore.create(tmp_path / "a.zarr", n_cols=4)
    with pytest.raises(InvalidInputError):
        store.append(FakeMatrix(shape))
    assert store.shape == (0, 4)
    store.close()
    assert sparsestore.open(tmp_path / "a.zarr").shape == (0, 4)


@pytest.mark.parametrize(
    "shape, row, col, exc",
    [((2**62, 5), [0], [0], UnsafeInputError), ((-1, 5), [0], [0], InvalidInputError),
     ((5, 2**62), [0], [0], UnsafeInputError), ((2, 5), [0], [2**40], InvalidInputError),
     ((2, 5), [-1], [0], InvalidInputError), ((2, 5), [5], [0], InvalidInputError)],
)
def test_from_coo_refuses_bad_shapes_and_indices(tmp_path, shape, row, col, exc):
    with pytest.raises(exc):
        from_coo(tmp_path / "a.zarr", np.array(row), np.array(col), np.array([1.0]), shape)
    no_stray(tmp_path, "a.zarr")


def test_huge_row_index_is_out_of_range(small_store):
    store, _, _ = small_store
    for key in (2**62, -(2**62), np.array([0, 2**62])):
        with pytest.raises(OutOfRangeError):
            store[key]


# --------------------------------------------------------- shell / eval / pickle

FORBIDDEN_CALLS = {
    ("os", "system"), ("os", "popen"), ("os", "execv"), ("os", "execvp"), ("os", "execl"),
    ("os", "spawnv"), ("os", "spawnl"), ("pickle", "load"), ("pickle", "loads"),
    ("marshal", "loads"), ("shelve", "open"), ("dill", "load"), ("dill", "loads"),
    ("cloudpickle", "loads"), ("commands", "getoutput"), ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput"),
}


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Calls that run a shell, evaluate code or unpickle, found by walking the AST."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        where = f"{filename}:{node.lineno}"
        if isinstance(f, ast.Name) and f.id in ("eval", "exec", "__import__"):
            found.append(f"{where}: {f.id}()")
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            if (f.value.id, f.attr) in FORBIDDEN_CALLS:
                found.append(f"{where}: {f.value.id}.{f.attr}()")
            if f.attr == "load" and f.value.id in ("np", "numpy"):
                kw = {k.arg: k.value for k in node.keywords}
                ap = kw.get("allow_pickle")
                if not (isinstance(ap, ast.Constant) and ap.value is False):
                    found.append(f"{where}: np.load without allow_pickle=False")
        for k in node.keywords:
            if k.arg == "shell" and not (isinstance(k.value, ast.Constant) and not k.value.value):
                found.append(f"{where}: shell={ast.unparse(k.value)}")
        if isinstance(f, ast.Attribute) and f.attr == "import_module":
            found.append(f"{where}: importlib.import_module() (dynamic import)")
    return found


def test_unsafe_call_detector_can_fail():
    bad = textwrap.dedent(
        """
        import os, subprocess, pickle, numpy as np
        os.system("rm -rf " + path)
        subprocess.run(cmd, shell=True)
        subprocess.Popen(cmd, shell=flag)
        pickle.loads(b)
        np.load(p)
        np.load(p, allow_pickle=True)
        eval(s)
        """
    )
    assert len(unsafe_calls(bad)) == 7
    good = (
        "import subprocess, numpy as np\n"
        "subprocess.run(['ls', p])\n"
        "np.load(p, allow_pickle=False)"
    )
    assert unsafe_calls(good) == []


def test_package_never_shells_out_evaluates_or_unpickles():
    files = sorted((REPO / "sparsestore").rglob("*.py")) + sorted((REPO / "adapters").rglob("*.py"))
    assert len(files) > 10
    problems = []
    for f in files:
        problems += unsafe_calls(f.read_text(), str(f.relative_to(REPO)))
    assert problems == []


# ------------------------------------------------- stores whose metadata names code

@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module that, if ever imported, writes a marker file."""
    marker = tmp_path / "IMPORTED"
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / f"{PAYLOAD}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Codec:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(mod_dir))
    monkeypatch.delitem(sys.modules, PAYLOAD, raising=False)
    yield marker
    assert not marker.exists(), "opening a store imported a module named in its metadata"
    assert PAYLOAD not in sys.modules


@pytest.fixture
def good(tmp_path):
    X = sp.random(100, 8, density=0.3, format="csr", dtype=np.float32, random_state=0)
    sparsestore.save(tmp_path / "good.zarr", X, labels={"y": np.arange(100)})
    return tmp_path / "good.zarr"


def _edit_json(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _assert_refused(path: Path, exc=SparseStoreError) -> None:
    with pytest.raises(exc) as info:
        sparsestore.open(path)
    assert str(info.value)
    try:
        report = validate_store(path)
    except SparseStoreError:
        return
    assert not report.ok


@pytest.mark.parametrize(
    "attrs, exc",
    [
        ({"encoding-type": "os.system"}, NotAStoreError),
        ({"encoding-type": f"{PAYLOAD}.Codec"}, NotAStoreError),
        ({"encoding-type": "anndata"}, NotAStoreError),
        ({"sparsestore": {"format": f"{PAYLOAD}:Store"}}, CorruptStoreError),
        ({"sparsestore": {"format": "csr", "layout": {"compressor": f"__import__('{PAYLOAD}')"}}},
         CorruptStoreError),
        ({"sparsestore": {"format": "csr", "labels": [f"../../{PAYLOAD}"]}}, CorruptStoreError),
        ({"shape": f"__import__('{PAYLOAD}')"}, CorruptStoreError),
    ],
)
def test_attrs_naming_code_are_data_only(good, evil_module, attrs, exc):
    def edit(obj):
        for k, v in attrs.items():
            if isinstance(v, dict) and isinstance(obj["attributes"].get(k), dict):
                obj["attributes"][k].update(v)
            else:
                obj["attributes"][k] = v

    _edit_json(good / "zarr.json", edit)
    _assert_refused(good, exc)


@pytest.mark.parametrize("codec", [PAYLOAD, f"{PAYLOAD}.Codec", "numcodecs.pickle", "pickle",
                                   "os.system"])
@pytest.mark.parametrize("array", ["data", "indptr", "labels/y"])
def test_codec_names_are_never_imported(good, evil_module, codec, array):
    def edit(obj):
        obj["codecs"] = [obj["codecs"][0], {"name": codec, "configuration": {}}]

    _edit_json(good / array / "zarr.json", edit)
    _assert_refused(good, CorruptStoreError)


@pytest.mark.filterwarnings("ignore::sparsestore.errors.UnverifiedStoreWarning")
def test_v2_compressor_id_naming_code(tmp_path, evil_module):
    ad = pytest.importorskip("anndata")
    X = sp.random(50, 6, density=0.3, format="csr", dtype=np.float32, random_state=0)
    g = zarr.open_group(str(tmp_path / "a.zarr"), mode="w", zarr_format=2)
    ad.io.write_elem(g, "X", X)
    path = tmp_path / "a.zarr" / "X"
    assert (sparsestore.open(path)[:] != X).nnz == 0
    for codec in ({"id": PAYLOAD}, {"id": "pickle", "protocol": 5}):
        _edit_json(path / "data" / ".zarray", lambda o, c=codec: o.update(compressor=c))
        _assert_refused(path, CorruptStoreError)


def test_dtype_naming_code(good, evil_module):
    _edit_json(good / "data" / "zarr.json", lambda o: o.update(data_type=f"{PAYLOAD}.Codec"))
    _assert_refused(good, CorruptStoreError)


def test_label_names_cannot_escape_the_store(tmp_path):
    for name in ("../x", "/etc/passwd", ".hidden", "__class__", "", 3):
        with pytest.raises(LabelError):
            sparsestore.save(tmp_path / "a.zarr", np.ones((2, 2)), labels={name: np.ones(2)})
    no_stray(tmp_path, "a.zarr")
    assert not (tmp_path / "x").exists()


def test_symlinked_store_is_a_store_not_a_target(tmp_path, good):
    """Opening through a symlink reads it; save(overwrite=True) replaces the link, never the
    directory it points to."""
    link = tmp_path / "link.zarr"
    link.symlink_to(good)
    assert sparsestore.open(link).shape == (100, 8)
    sparsestore.save(link, np.ones((3, 8), dtype=np.float32), overwrite=True)
    assert sparsestore.open(good).shape == (100, 8)
    assert sparsestore.open(link).shape == (3, 8)

