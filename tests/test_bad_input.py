"""Bad input: declared shapes the data does not back, unparsable numbers, mistagged
anndata elements, NaN/inf values, and what the command line makes of them.

Every expectation comes from the input as built here (positions, counts) or from an
independent reader (``scipy.io.mmread``, scipy's own COO -> CSR), never from sparsestore.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io as sio
import scipy.sparse as sp

import sparsestore
import sparsestore.cli as cli
from sparsestore.blocks import MAX_BLOCK_ROWS, coo_row_blocks
from sparsestore.canonical import (
    ROW_ALLOWANCE,
    ROWS_PER_ENTRY,
    canonical_block,
    check_row_count,
)
from sparsestore.cli import main
from sparsestore.errors import (
    FormatError,
    InvalidInputError,
    StoreNotFoundError,
    UnsafeInputError,
)
from sparsestore.ingest import from_coo, from_dict

REPO = Path(__file__).resolve().parents[1]
BIG = 10**8  # declared rows that a 69-byte file used to turn into 1.6 GB of indptr
HUGE = 10**12  # declared rows whose indptr (8 TB) cannot be written at all
ROW = 54_321_987  # 0-based row of the one entry in the BIG files


def write_mtx(path: Path, n_rows: int, n_cols: int, entries: list[tuple[int, int, str]],
              field: str = "real") -> Path:
    """A coordinate Matrix Market file written by hand (1-based indices)."""
    lines = [f"%%MatrixMarket matrix coordinate {field} general",
             f"{n_rows} {n_cols} {len(entries)}"]
    lines += [f"{r + 1} {c + 1} {v}" for r, c, v in entries]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_h5ad_sparse(path: Path, enc: str, shape: tuple[int, int], data: list[float],
                      indices: list[int], indptr: list[int]) -> Path:
    """An .h5ad whose X is a CSR/CSC group written by hand with h5py."""
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        g = f.create_group("X")
        g.attrs["encoding-type"] = enc
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = np.array(shape, dtype=np.int64)
        g.create_dataset("data", data=np.asarray(data, dtype=np.float32))
        g.create_dataset("indices", data=np.asarray(indices, dtype=np.int32))
        g.create_dataset("indptr", data=np.asarray(indptr, dtype=np.int64))
    return path


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; assert it failed with exactly one ``sparsestore: error:`` line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsestore: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------ declared row counts

def test_check_row_count_rule_boundary():
    for nnz in (0, 1, 1000):
        limit = ROW_ALLOWANCE + ROWS_PER_ENTRY * nnz
        check_row_count(limit, nnz, "x")
        with pytest.raises(UnsafeInputError, match=f"{limit + 1} rows for {nnz} stored"):
            check_row_count(limit + 1, nnz, "x")


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, scipy.sparse as sp
    import sparsestore
    from sparsestore.ingest import from_dict

    tmp, BIG, ROW = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def run(n, tag):
        sparsestore.convert(f"{tmp}/{tag}.mtx", f"{tmp}/{tag}-mtx.zarr", progress=False)
        from_dict(f"{tmp}/{tag}-dict.zarr", {(ROW % n, 2): 2.5}, shape=(n, 5))
        sparsestore.convert(f"{tmp}/{tag}.npz", f"{tmp}/{tag}-npz.zarr", progress=False)
        sparsestore.convert(f"{tmp}/{tag}.h5ad", f"{tmp}/{tag}-h5ad.zarr", progress=False)
        coo = sp.coo_matrix(([2.5], ([ROW % n], [2])), shape=(n, 5))
        sparsestore.save(f"{tmp}/{tag}-save.zarr", coo)

    run(100, "small")  # every code path once: imports and caches are not counted
    base = peak()
    run(BIG, "big")
    print(json.dumps({"base": base, "growth": peak() - base}))
""")


def _big_sources(tmp: Path, n: int, tag: str) -> None:
    """The same one-entry matrix (row ROW % n, column 2, 2.5) in every declaring format."""
    r = ROW % n
    write_mtx(tmp / f"{tag}.mtx", n, 5, [(r, 2, "2.5")])
    np.savez_compressed(tmp / f"{tag}.npz", row=np.array([r]), col=np.array([2]),
                        data=np.array([2.5]), shape=np.array([n, 5]))
    write_h5ad_sparse(tmp / f"{tag}.h5ad", "csc_matrix", (n, 5), [2.5], [r],
                      [0, 0, 0, 1, 1, 1])


@pytest.mark.timeout(300)
def test_declared_rows_cost_memory_of_the_data_not_the_shape(tmp_path):
    """A 10**8-row declaration with one entry converts within ~200 MB of peak RSS growth
    (not arrays sized by the declared rows), from every source that declares its rows, and
    reads back right."""
    for n, tag in ((100, "small"), (BIG, "big")):
        _big_sources(tmp_path, n, tag)
    r = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path), str(BIG),
                        str(ROW)], capture_output=True, text=True, cwd=REPO, timeout=280)
    assert r.returncode == 0, r.stderr
    growth = json.loads(r.stdout.strip().splitlines()[-1])["growth"]
    assert growth < 200 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    ref = sio.mmread(tmp_path / "big.mtx")  # COO: no row-sized arrays
    assert ref.shape == (BIG, 5) and list(ref.row) == [ROW] and list(ref.col) == [2]
    for kind in ("mtx", "dict", "npz", "h5ad", "save"):
        s = sparsestore.open(tmp_path / f"big-{kind}.zarr")
        assert s.shape == ref.shape and s.nnz == 1, kind
        got = s[ROW - 1 : ROW + 2].toarray()
        want = np.zeros((3, 5))
        want[1, 2] = ref.data[0]
        np.testing.assert_array_equal(got, want, err_msg=kind)
        np.testing.assert_array_equal(s.indptr(0, 3), [0, 0, 0, 0])
        np.testing.assert_array_equal(s.indptr(ROW - 1, ROW + 1), [0, 0, 1])
        np.testing.assert_array_equal(s.indptr(BIG - 2, BIG), [1, 1, 1])


@pytest.mark.timeout(60)
def test_huge_declared_rows_are_refused_before_allocating(tmp_path):
    _big_sources(tmp_path, HUGE, "huge")
    for name in ("huge.mtx", "huge.npz", "huge.h5ad"):
        with pytest.raises(UnsafeInputError, match=f"{HUGE} rows for 1 stored") as info:
            sparsestore.convert(tmp_path / name, tmp_path / "o.zarr")
        assert name in str(info.value)
        assert not (tmp_path / "o.zarr").exists()
    with pytest.raises(UnsafeInputError, match=f"{HUGE} rows"):
        from_dict(tmp_path / "d.zarr", {(5, 2): 2.5}, shape=(HUGE, 5))
    with pytest.raises(UnsafeInputError, match=f"{HUGE} rows"):
        from_coo(tmp_path / "c.zarr", [5], [2], [2.5], shape=(HUGE, 5))
    with pytest.raises(UnsafeInputError, match=f"{HUGE} rows"):
        sparsestore.save(tmp_path / "s.zarr", sp.coo_matrix(([2.5], ([5], [2])),
                                                            shape=(HUGE, 5)))
    assert not any(p.name.endswith(".zarr") for p in tmp_path.iterdir())


@pytest.mark.timeout(60)
def test_cli_refuses_huge_mtx_in_one_line(tmp_path, capsys):
    src = write_mtx(tmp_path / "huge.mtx", HUGE, 5, [(7, 3, "2.5")])
    line = one_line_error(capsys, ["convert", str(src), str(tmp_path / "o.zarr"), "-q"])
    assert str(HUGE) in line and "huge.mtx" in line and "indptr" in line
    # the console entry point, as a user runs it: no MemoryError, no traceback
    r = subprocess.run([sys.executable, "-m", "sparsestore.cli", "convert", str(src),
                        str(tmp_path / "o.zarr")], capture_output=True, text=True, cwd=REPO,
                       timeout=50)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("sparsestore: error: ")
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("seed", range(4))
def test_coo_row_blocks_bounded_in_rows_and_entries(seed):
    rng = np.random.default_rng(seed)
    n, m, k = int(rng.integers(1, 5000)), 7, int(rng.integers(0, 3000))
    row = rng.integers(0, n, k)
    row[: k // 3] = row[0] if k else 0  # one heavy row, beyond the entry budget
    col = rng.integers(0, m, k)
    data = rng.standard_normal(k)
    target, max_rows = 50, 64
    blocks = list(coo_row_blocks(row, col, data, (n, m), target_nnz=target, max_rows=max_rows))
    bounds = [(a, b) for a, b, _ in blocks]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(b1[1] == b2[0] for b1, b2 in zip(bounds, bounds[1:], strict=False))
    for a, b, blk in blocks:
        assert 1 <= b - a <= max_rows and blk.shape == (b - a, m)
        assert blk.indptr[-2] < target  # about target entries: its last row goes past
    got = sp.vstack([blk for _, _, blk in blocks], format="csr")
    want = sp.coo_matrix((data, (row, col)), shape=(n, m)).tocsr()  # scipy sums duplicates
    np.testing.assert_allclose(got.toarray(), want.toarray(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("executor", [False, True])
def test_npz_coo_shard_with_more_rows_than_entries(tmp_path, executor):
    """A COO shard declaring more rows than MAX_BLOCK_ROWS and its entries goes through
    the sorted-COO path; the store must equal scipy's own conversion of the shard."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    n = 3 * MAX_BLOCK_ROWS + 11
    row = np.concatenate([rng.integers(0, n, 400), [n - 1, n - 1, 0]])
    col = rng.integers(0, 9, row.size)
    data = rng.standard_normal(row.size)
    np.savez_compressed(tmp_path / "c.npz", row=row, col=col, data=data, shape=[n, 9])
    want = sp.coo_matrix((data, (row, col)), shape=(n, 9)).tocsr()
    if executor:
        with ThreadPoolExecutor(1) as ex:
            s = sparsestore.convert(tmp_path / "c.npz", tmp_path / "c.zarr", executor=ex)
    else:
        s = sparsestore.convert(tmp_path / "c.npz", tmp_path / "c.zarr")
    got = s[:]
    assert got.shape == want.shape and got.nnz == want.nnz
    assert abs(got - want).max() < 1e-12


# ------------------------------------------------------------ unparsable input

def test_svmlight_index_beyond_int64_names_file_and_line(tmp_path, capsys):
    p = tmp_path / "big.svm"
    p.write_text("1 1:2\n0 99999999999999999999:1\n")
    with pytest.raises(FormatError, match=r"big\.svm, line 2: .*99999999999999999999"):
        sparsestore.convert(p, tmp_path / "o.zarr")
    line = one_line_error(capsys, ["convert", str(p), str(tmp_path / "o.zarr")])
    assert "line 2" in line
    assert not (tmp_path / "o.zarr").exists()
    datasets = pytest.importorskip("sklearn.datasets")
    with pytest.raises(OverflowError):  # scikit-learn, the oracle, refuses it too
        datasets.load_svmlight_file(str(p))


@pytest.mark.parametrize("text,line,what", [
    ("1 qid:99999999999999999999 1:2\n", 1, "qid"),
    ("1 1:2\n\n# comment\n2 3:x\n", 4, "value"),
    ("1 1:2\n1 -4:1\n", 2, "negative"),
    ("1 1:2\nabc 1:2\n", 2, "label"),
])
def test_svmlight_bad_token_names_its_line(tmp_path, text, line, what):
    p = tmp_path / "bad.svm"
    p.write_text(text)
    with pytest.raises(FormatError, match=rf"bad\.svm, line {line}: .*{what}"):
        sparsestore.convert(p, tmp_path / "o.zarr", n_features=10, zero_based=False)
    if what != "qid":  # scikit-learn, the oracle, refuses these too (it wraps a huge qid)
        datasets = pytest.importorskip("sklearn.datasets")
        with pytest.raises(ValueError):
            datasets.load_svmlight_file(str(p), n_features=10, zero_based=False)


@pytest.mark.parametrize("name", ["d.svm.gz", "d.mtx.gz"])
def test_corrupt_gzip_text_is_a_format_error(tmp_path, name):
    body = ("%%MatrixMarket matrix coordinate real general\n400 3 400\n"
            + "".join(f"{i + 1} 1 {i}.5\n" for i in range(400))) if "mtx" in name else \
        "".join(f"{i} 1:{i}.5 2:3\n" for i in range(400))
    raw = bytearray(gzip.compress(body.encode()))
    raw[len(raw) // 2 : len(raw) // 2 + 40] = b"\xff" * 40
    (tmp_path / name).write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=name.replace(".", r"\.")):
        sparsestore.convert(tmp_path / name, tmp_path / "o.zarr")


def test_mtx_index_beyond_int64_is_a_format_error(tmp_path):
    p = write_mtx(tmp_path / "i.mtx", 3, 3, [(0, 99999999999999999998, "1")])
    with pytest.raises(FormatError, match=r"i\.mtx: column index \d+ is outside 1\.\.3"):
        sparsestore.convert(p, tmp_path / "o.zarr")
    p = write_mtx(tmp_path / "v.mtx", 3, 3, [(0, 0, "99999999999999999999")], field="integer")
    with pytest.raises(FormatError, match=r"v\.mtx"):
        sparsestore.convert(p, tmp_path / "o.zarr")


def test_h5ad_x_dataset_tagged_csr_is_a_format_error(tmp_path, capsys):
    for with_shape in (True, False):
        p = tmp_path / f"x{with_shape}.h5ad"
        with h5py.File(p, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            d = f.create_dataset("X", data=np.ones((3, 4)))
            d.attrs["encoding-type"] = "csr_matrix"
            d.attrs["encoding-version"] = "0.1.0"
            if with_shape:
                d.attrs["shape"] = [3, 4]
        with pytest.raises(FormatError, match=rf"x{with_shape}\.h5ad: X is tagged 'csr_matrix'"):
            sparsestore.convert(p, tmp_path / "o.zarr")
        line = one_line_error(capsys, ["convert", str(p), str(tmp_path / "o.zarr")])
        assert p.name in line


@pytest.mark.parametrize("shape,indices,indptr,match", [
    ((2, 4), [0, 3], [0, 1], "indptr entries"),  # indptr one short
    ((2, 4), [0, 3], [0, 1, 3], "runs from 0 to 3"),  # indptr past the data
    ((2, 4), [0], [0, 1, 2], "1 indices"),  # indices shorter than data
])
def test_h5ad_sparse_structure_checked_against_its_shape(tmp_path, shape, indices, indptr,
                                                         match):
    p = write_h5ad_sparse(tmp_path / "s.h5ad", "csr_matrix", shape, [1.0, 2.0], indices,
                          indptr)
    with pytest.raises(FormatError, match=match):
        sparsestore.convert(p, tmp_path / "o.zarr")


def test_h5ad_sparse_group_missing_an_array(tmp_path):
    p = write_h5ad_sparse(tmp_path / "s.h5ad", "csr_matrix", (2, 4), [1.0], [0], [0, 1, 1])
    with h5py.File(p, "a") as f:
        del f["X/indptr"]
    with pytest.raises(FormatError, match=r"s\.h5ad: X \(csr_matrix\) has no 1-D 'indptr'"):
        sparsestore.convert(p, tmp_path / "o.zarr")


# ------------------------------------------------------------ the command line

@pytest.mark.parametrize("exc", [TypeError("bug"), KeyError("bug"), ValueError("bug"),
                                 AttributeError("bug")])
def test_cli_lets_bugs_show_their_traceback(monkeypatch, exc):
    def broken(args):
        raise exc

    monkeypatch.setitem(cli.COMMANDS, "info", broken)
    with pytest.raises(type(exc)):
        main(["info", "x.zarr"])


@pytest.mark.parametrize("exc,rc", [(StoreNotFoundError("no store at x"), 1),
                                    (PermissionError(13, "Permission denied"), 1),
                                    (KeyboardInterrupt(), 130)])
def test_cli_reports_library_and_os_errors_in_one_line(monkeypatch, capsys, exc, rc):
    def failing(args):
        raise exc

    monkeypatch.setitem(cli.COMMANDS, "info", failing)
    assert main(["info", "x.zarr"]) == rc
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("sparsestore: ")


# ------------------------------------------------------------ NaN and inf

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_canonical_block_refuses_non_finite_naming_row_and_column(bad):
    X = np.zeros((6, 9))
    X[1, 1] = 3.0
    X[4, 7] = bad
    X[5, 0] = bad  # only the first is named
    for block in (X, sp.csr_matrix(X), sp.coo_matrix(X)):
        with pytest.raises(InvalidInputError, match=r"row 104, column 7 .*nan_policy='keep'"):
            canonical_block(block, first_row=100)
    with pytest.raises(InvalidInputError, match="row 4 of the block, column 7"):
        canonical_block(X)
    vals, ind, ptr = canonical_block(X, nan_policy="keep")
    back = sp.csr_matrix((vals, ind, ptr), shape=X.shape).toarray()
    np.testing.assert_array_equal(back, X)  # NaN compares equal here


def test_canonical_block_finite_and_integer_blocks_pass():
    X = sp.random(50, 20, density=0.3, format="csr", random_state=1)
    vals, _, _ = canonical_block(X)
    assert np.isfinite(vals).all() and vals.size == X.nnz
    ints = sp.csr_matrix(np.array([[0, 5], [-3, 0]], dtype=np.int64))
    assert canonical_block(ints)[0].tolist() == [5, -3]


def test_canonical_block_refuses_values_made_non_finite_by_the_write():
    dup = sp.csr_matrix((np.array([1e308, 1e308]), np.array([1, 1]), np.array([0, 0, 2])),
                        shape=(2, 3))  # duplicates summed: inf
    with pytest.raises(InvalidInputError, match="row 1, column 1 holds inf"):
        canonical_block(dup, first_row=0)
    with np.errstate(over="ignore"), pytest.raises(
        InvalidInputError, match=r"row 0, column 0 holds 1e\+300, which float32 cannot hold"
    ):
        canonical_block(np.array([[1e300, 0.0]]), dtype=np.float32, first_row=0)
    with pytest.raises(InvalidInputError, match="row 0, column 1 holds nan"):
        canonical_block(np.array([[0.0, np.nan]]), dtype=np.int32, first_row=0)


@pytest.mark.parametrize("policy", ["ignore", "RAISE", None, True])
def test_nan_policy_value_is_checked(tmp_path, policy):
    with pytest.raises(InvalidInputError, match="nan_policy must be 'raise'.* or 'keep'"):
        canonical_block(np.ones((2, 2)), nan_policy=policy)
    src = write_mtx(tmp_path / "m.mtx", 2, 2, [(0, 0, "1")])
    with pytest.raises(InvalidInputError, match="nan_policy"):
        sparsestore.convert(src, tmp_path / "o.zarr", nan_policy=policy)
    assert not (tmp_path / "o.zarr").exists()


def test_convert_nan_policy_raise_and_keep(tmp_path, capsys):
    src = write_mtx(tmp_path / "n.mtx", 4, 3, [(0, 0, "1.5"), (2, 1, "nan"), (3, 2, "inf")])
    ref = sio.mmread(src)  # the oracle: scipy's reader
    first = int(np.flatnonzero(~np.isfinite(ref.data))[0])
    where = f"row {ref.row[first]}, column {ref.col[first]}"
    with pytest.raises(InvalidInputError, match=where):
        sparsestore.convert(src, tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()
    s = sparsestore.convert(src, tmp_path / "k.zarr", nan_policy="keep")
    np.testing.assert_array_equal(s[:].toarray(), ref.toarray())
    line = one_line_error(capsys, ["convert", str(src), str(tmp_path / "c.zarr"), "-q"])
    assert where in line and "nan_policy" in line
    assert main(["convert", str(src), str(tmp_path / "c.zarr"), "-q",
                 "--nan-policy", "keep"]) == 0
    np.testing.assert_array_equal(sparsestore.open(tmp_path / "c.zarr")[:].toarray(),
                                  ref.toarray())


def test_convert_names_the_row_in_the_whole_matrix(tmp_path):
    """A NaN in the second of two npz shards is named by its row in the store."""
    a = sp.random(500, 30, density=0.2, format="csr", random_state=2)
    b = sp.random(400, 30, density=0.2, format="csr", random_state=3).tolil()
    b[37, 11] = np.nan
    sp.save_npz(tmp_path / "p0.npz", a)
    sp.save_npz(tmp_path / "p1.npz", b.tocsr())
    with pytest.raises(InvalidInputError, match="row 537, column 11 holds nan"):
        sparsestore.convert([tmp_path / "p0.npz", tmp_path / "p1.npz"], tmp_path / "o.zarr")
    assert not (tmp_path / "o.zarr").exists()
