"""Reliability report: inject faults and hostile input, tabulate what happened.

``python -m benchmarks reliability [--quick] [--out DIR]`` SIGKILLs writers during save,
append and convert, flips bytes in every kind of chunk, damages chunk files and metadata,
fills the disk, and feeds malformed and hostile input; it writes ``reliability.json`` and
the table generated from it, ``reliability.md``, to ``DIR`` (default ``benchmarks/out``).
The fault drivers and oracles are the tests' own: :mod:`benchmarks.crash_worker`,
:mod:`benchmarks.forge`, :mod:`benchmarks.tamper`.  Every row states how many faults or
inputs were tried and how many ended as the library promises (no store or exactly the
committed rows; a SparseStoreError and a failed validate; nothing written); any other
outcome is in bold and makes the command exit 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

import sparsestore
from sparsestore.errors import SparseStoreError
from sparsestore.validate import validate_store

from . import crash_worker as cw
from . import forge
from . import tamper as tt
from .common import add_out_argument, dir_bytes
from .records import run_meta, write_records

PARALLEL = 3
Row = tuple[str, int, str]


# ------------------------------------------------------------------ outcomes


def _outcome(read: Callable[[], Any], want: Any = None) -> str:
    """'refused: Class' for a SparseStoreError, 'same' when ``read()`` equals ``want``,
    'silent' when it differs (or when nothing was to be read back), 'raw: Class' for any
    other exception."""
    try:
        got = read()
    except SparseStoreError as exc:
        return f"refused: {type(exc).__name__}"
    except Exception as exc:  # noqa: BLE001 - a raw error is a finding, reported
        return f"raw: {type(exc).__name__}"
    if want is None:
        return "silent"
    if sp.issparse(want):
        same = sp.issparse(got) and got.shape == want.shape and (got != want).nnz == 0
    else:
        same = np.array_equal(np.asarray(got), want)
    return "same" if same else "silent"


def _validated(path: Path, outcome: str) -> str:
    """``outcome`` and what validate said of the store at ``path``."""
    try:
        ok = validate_store(path).ok
    except SparseStoreError:
        ok = False
    return f"{outcome}, validate {'passed' if ok else 'failed'}"


def _caught(k: str) -> bool:
    return k.startswith("refused") and k.endswith("validate failed")


def _promised(k: str) -> bool:
    return k.startswith(("refused", "same"))


def _row(label: str, n: int, res: Counter, ok: str,
         good: Callable[[str], bool] = _promised) -> Row:
    """How many of ``n`` tries ended as promised (``good``; ``ok`` says what that is), each
    outcome counted; any other outcome puts the row in bold."""
    res = +res
    bad = sum(v for k, v in res.items() if not good(k))
    silent = sum(v for k, v in res.items() if k.startswith("silent"))
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(res.items()))
    text = f"{n - bad}/{n} {ok} ({kinds}), silently wrong {silent}"
    return label, n, f"**{text}**" if bad else text


def _copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def _csr(n: int, m: int, density: float, seed: int, plus: float = 1.0) -> sp.csr_matrix:
    """A random float32 CSR, ``plus`` added to its values (so none is zero)."""
    X = sp.random(n, m, density=density, format="csr", dtype=np.float32, random_state=seed)
    X.data += plus
    return X


def _edit_meta(path: Path, fn: Callable[[dict], Any]) -> None:
    """Apply ``fn`` to the JSON document at ``path``, in place."""
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def _chunk_files(store: Path, array: str) -> list[Path]:
    return sorted(p.relative_to(store) for p in (store / array / "c").rglob("*") if p.is_file())


# ------------------------------------------------------------------ kills


def check_job(job: dict) -> str:
    """What a killed writer left: ``"absent"``, ``"complete"``, ``"k/n"`` blocks committed
    (the crash test's own oracle, :func:`tests.test_crash.check`), or ``"FAIL: ..."``."""
    from tests.test_crash import check

    try:
        return check(job)["outcome"]
    except Exception as exc:  # noqa: BLE001 - a broken promise is a finding, reported
        return f"FAIL: {type(exc).__name__}: {exc}"


def run_kills(tmp: Path, kills_per_op: int, rng: Any) -> list[Row]:
    server = cw.Server()
    rows = []
    try:
        shards = []
        for s in range(0, 60, 10):
            shards.append(str(tmp / f"part{s:03d}.npz"))
            sp.save_npz(shards[-1], cw.blocks(s, s + 10)[0])
        tpl = tmp / "tpl.zarr"
        with sparsestore.create(tpl, n_cols=cw.COLS, dtype=np.float32, **cw.LAYOUT) as st:
            st.append(*cw.blocks(0, 3))
        counter = iter(range(10**9))

        def job(op: str) -> dict:
            d = tmp / f"k{next(counter)}"
            d.mkdir()
            base = {"path": str(d / "s.zarr"), "side": str(d / "side.txt"), "op": op}
            if op == "append":
                shutil.copytree(tpl, d / "s.zarr")
                return {**base, "start": 3, "stop": 9}
            return {**base, "n_blocks": 60, **({"src": shards} if op == "convert" else {})}

        for op in ("save", "append", "convert"):
            calib = cw.run_batch(server, [job(op) for _ in range(PARALLEL)], None, rng,
                                 check_exit=False)
            window = 1.1 * max(j["seconds"] for j in calib)
            outcomes: Counter[str] = Counter()
            for _ in range(200):
                if sum(outcomes.values()) >= kills_per_op:
                    break
                for j in cw.run_batch(server, [job(op) for _ in range(PARALLEL)], window,
                                      rng, check_exit=False):
                    if j["killed"]:
                        outcomes[check_job(j)] += 1
                    shutil.rmtree(Path(j["path"]).parent, ignore_errors=True)
            rows.append(_row(f"Kill -9 during {op}", sum(outcomes.values()), outcomes,
                             "consistent", lambda k: not k.startswith("FAIL")))
    finally:
        server.close()
    return rows


# ------------------------------------------------------------- corruption


def run_flips(tmp: Path, flips_per_array: int, rng: Any) -> list[Row]:
    n = 2000
    X = _csr(n, 60, 0.1, 7, plus=0)
    labels = {"y": np.arange(n), "w": np.ones((n, 2), np.float32)}
    sparsestore.save(tmp / "s.zarr", X, labels=labels, chunk_bytes=2048, indptr_chunk=128,
                     dense_chunk_bytes=2048)
    sparsestore.save(tmp / "sh.zarr", X, chunk_bytes=2048, shard_bytes=8192)
    D = np.arange(n * 12, dtype=np.float32).reshape(n, 12)
    sparsestore.save(tmp / "d.zarr", D, sparse=False, dense_chunk_bytes=2048)
    rows = []
    for store_name, array in (("s.zarr", "data"), ("s.zarr", "indices"), ("s.zarr", "indptr"),
                              ("s.zarr", "labels/y"), ("s.zarr", "labels/w"),
                              ("sh.zarr", "data"), ("d.zarr", "X")):
        files = _chunk_files(tmp / store_name, array)
        res: Counter[str] = Counter()
        for _ in range(flips_per_array):
            work = _copy(tmp / store_name, tmp / "flip.zarr")
            victim = work / files[int(rng.integers(len(files)))]
            raw = bytearray(victim.read_bytes())
            raw[int(rng.integers(len(raw)))] ^= int(rng.integers(1, 256))
            victim.write_bytes(bytes(raw))
            res[_validated(work, _outcome(lambda w=work, a=array: _read_all(w, a)))] += 1
        kind = {"sh.zarr": " (sharded)", "d.zarr": " (dense)"}.get(store_name, "")
        rows.append(_row(f"Byte flip in `{array}` chunk{kind}", flips_per_array, res,
                         "read refused and validate failed", _caught))
    return rows


def _read_all(path: Path, array: str) -> Any:
    """Everything ``array`` holds (a label, or the matrix)."""
    st = sparsestore.open(path)
    return st.labels[array.split("/")[1]][:] if array.startswith("labels/") else st[:]


def run_damage(tmp: Path, tries: int, rng: Any) -> list[Row]:
    """Chunks deleted, moved, or copied in from another store; array metadata edited; a
    store saved over while a reader has it open."""
    n, m = 4000, 300
    X, Y = _csr(n, m, 0.05, 0), _csr(n, m, 0.05, 5)
    lay = {"chunk_bytes": 4096, "indptr_chunk": 256, "dense_chunk_bytes": 4096}
    labels = {"y": np.arange(n)}
    D = np.arange(n * 12, dtype=np.float32).reshape(n, 12) + 1
    sparsestore.save(tmp / "s.zarr", X, labels=labels, **lay)
    sparsestore.save(tmp / "o.zarr", Y, labels={"y": np.arange(n)[::-1].copy()}, **lay)
    sparsestore.save(tmp / "sh.zarr", X, shard_bytes=16384, **lay)
    sparsestore.save(tmp / "d.zarr", D, sparse=False, **lay)
    sparsestore.save(tmp / "kz.zarr", X, keep_zeros=True, **lay)
    sparsestore.save(tmp / "nc.zarr", X, checksum=False, **lay)
    truth = {"s.zarr": X, "sh.zarr": X, "d.zarr": D, "kz.zarr": X, "nc.zarr": X}
    cases = [("s.zarr", "data"), ("s.zarr", "indices"), ("s.zarr", "indptr"),
             ("s.zarr", "labels/y"), ("sh.zarr", "data"), ("d.zarr", "X"),
             ("kz.zarr", "data"), ("nc.zarr", "data")]
    kind = {"sh.zarr": " (sharded)", "d.zarr": " (dense)", "kz.zarr": " (keep_zeros)",
            "nc.zarr": " (checksum=False)"}
    rows = []

    def attempt(store_name: str, array: str, damage: Callable[[Path], None]) -> str:
        work = _copy(tmp / store_name, tmp / "work.zarr")
        damage(work)
        want = labels["y"] if array == "labels/y" else truth[store_name]
        return _validated(work, _outcome(lambda: _read_all(work, array), want))

    def row(label: str, res: Counter) -> None:
        rows.append(_row(label, sum(res.values()), res, "read refused and validate failed",
                         _caught))

    for store_name, array in cases:
        files = _chunk_files(tmp / store_name, array)
        res: Counter[str] = Counter()
        for _ in range(tries):
            victim = files[int(rng.integers(len(files)))]
            res[attempt(store_name, array, lambda w, v=victim: (w / v).unlink())] += 1
        row(f"Chunk file deleted: `{array}`{kind.get(store_name, '')}", res)
    for store_name, array in cases:
        files = _chunk_files(tmp / store_name, array)
        res = Counter()
        for t in range(tries):
            a, b = (int(i) for i in rng.choice(len(files), 2, replace=False))
            other = tmp / "o.zarr" / files[b]
            how = t % 3 if store_name == "s.zarr" and other.exists() else 0

            def damage(w: Path, s: Path = files[a], d: Path = files[b], how: int = how,
                       other: Path = other) -> None:
                if how == 0:  # another position of the same array
                    shutil.copyfile(w / s, w / d)
                elif how == 1:  # the same position of another store
                    shutil.copyfile(other, w / d)
                else:  # a symlink to it
                    (w / d).unlink()
                    os.symlink(other, w / d)

            res[attempt(store_name, array, damage)] += 1
        row(f"Chunk moved / from another store / symlinked: `{array}`"
            f"{kind.get(store_name, '')}", res)

    def grid(shape: list[int]) -> Callable[[dict], Any]:
        return lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=shape)

    edits = [  # (the array whose zarr.json is edited, "" for the group's; the edit)
        ("data", lambda m: m.update(data_type="int32")),
        ("data", lambda m: m.update(data_type="uint32")),
        ("data", lambda m: m["codecs"][0]["configuration"].update(endian="big")),
        ("labels/y", lambda m: m.update(data_type="float64")),
        ("data", lambda m: m.update(codecs=m["codecs"][:-1])),
        ("data", grid([2048])),
        ("data", grid([2**40])),
        ("", lambda o: o["attributes"].update(shape=[n, m + 50])),
    ]
    row("Array metadata edited (dtype, endian, labels dtype, codecs, chunk shape, n_cols)",
        Counter(attempt("s.zarr", a or "data", lambda w, a=a, fn=fn: _edit_meta(
            w / a / "zarr.json", fn)) for a, fn in edits))

    res = Counter()
    for rows_b in (n // 4, n, 2 * n):
        shutil.rmtree(tmp / "ow.zarr", ignore_errors=True)
        sparsestore.save(tmp / "ow.zarr", X, labels=labels, **lay)
        old = sparsestore.open(tmp / "ow.zarr")
        B = sp.random(rows_b, m, density=0.05, format="csr", dtype=np.float32, random_state=9)
        sparsestore.save(tmp / "ow.zarr", B, labels={"y": np.zeros(rows_b, np.int64)},
                         overwrite=True, **lay)
        for read in (lambda o=old: o[:], lambda o=old: o.labels["y"][:]):
            res[_outcome(read)] += 1
    rows.append(_row("Store saved over while a reader has it open (B smaller, equal, larger; "
                     "matrix and labels)", 6, res, "refused with StoreChangedError",
                     lambda k: k == "refused: StoreChangedError"))
    return rows


# ------------------------------------------------------------ environment


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".sparsestore.lock"}


_EFBIG_CHILD = """
import json, resource, signal, sys
import numpy as np, scipy.sparse as sp, sparsestore
from sparsestore.errors import FileTooLargeError
path, big, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
st = sparsestore.open(path, "r+")
X = sp.load_npz(big)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
try:
    st.append(X, labels={"y": np.arange(st.n_rows, st.n_rows + X.shape[0])})
    out = "appended"
except FileTooLargeError as exc:
    out = "refused" if exc.errno == 27 and isinstance(exc, OSError) else "wrong errno"
except Exception as exc:
    out = type(exc).__name__
print(json.dumps(out))
"""


def run_environment(tmp: Path, tries: int, rng: Any) -> list[Row]:
    """Appends that run out of disk space (a zarr write budget) or past RLIMIT_FSIZE: the
    error is a SparseStoreError that is also the OSError, and the store is byte for byte
    what it was (space given back), or the append fit and every row reads back."""
    import zarr.storage._local as local

    from sparsestore.errors import DiskFullError

    n, m = 2000, 200
    X, B = _csr(n, m, 0.05, 1, plus=0), _csr(6000, m, 0.05, 2, plus=0)
    base = tmp / "base.zarr"
    sparsestore.save(base, X, labels={"y": np.arange(n)}, chunk_bytes=256 * 1024)
    sparsestore.open(base, "r+").close()
    sp.save_npz(tmp / "big.npz", B)
    both = sp.vstack([X, B], format="csr")

    def verdict(path: Path, before: dict[str, str], outcome: str) -> str:
        st = sparsestore.open(path)
        if outcome == "refused":
            exact = st.n_rows == n and (st[:] != X).nnz == 0 and _digest(path) == before
            return "refused" if exact and validate_store(path).ok else "damaged"
        if outcome == "appended":
            return "same" if (st[:] != both).nnz == 0 else "damaged"
        return outcome

    res: Counter[str] = Counter()
    put = local._put
    for _ in range(tries):
        work = _copy(base, tmp / "full.zarr")
        before = _digest(work)
        cap = dir_bytes(work) + int(rng.integers(0, 300_000))  # a file system with that much free

        def limited(path: Any, value: Any, exclusive: bool = False, work: Path = work,
                    cap: int = cap) -> Any:
            path = Path(path)
            if work in path.parents:
                old = path.stat().st_size if path.exists() else 0
                if dir_bytes(work) - old + len(value) > cap:
                    raise OSError(28, os.strerror(28), str(path))
            return put(path, value, exclusive)

        local._put = limited
        try:
            with sparsestore.open(work, "r+") as st:
                st.append(B, labels={"y": np.arange(n, n + B.shape[0])})
            outcome = "appended"
        except DiskFullError as exc:
            outcome = "refused" if exc.errno == 28 else "wrong errno"
        except Exception as exc:  # noqa: BLE001 - reported
            outcome = type(exc).__name__
        finally:
            local._put = put
        res[verdict(work, before, outcome)] += 1
    ok = "raised {} (an OSError, errno kept) with the store byte-identical, or fit and read back"
    rows = [_row("Disk full during append (ENOSPC at a random point)", tries, res,
                 ok.format("DiskFullError"))]

    res = Counter()
    for _ in range(tries):
        work = _copy(base, tmp / "fsize.zarr")
        before = _digest(work)
        limit = int(rng.integers(20_000, 300_000))
        proc = subprocess.run([sys.executable, "-c", _EFBIG_CHILD, str(work),
                               str(tmp / "big.npz"), str(limit)],
                              capture_output=True, text=True, timeout=300)
        outcome = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 \
            else f"exit {proc.returncode}"
        res[verdict(work, before, outcome)] += 1
    rows.append(_row("File-size limit during append (RLIMIT_FSIZE, random limit)", tries, res,
                     ok.format("FileTooLargeError")))
    return rows


# ---------------------------------------------------------- hostile input


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


class _Fake:
    """An array-like of any ``shape`` that fails if anything materialises it."""

    dtype = np.dtype(np.float32)

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __array__(self, *a: Any, **k: Any) -> Any:
        raise AssertionError("materialised")


def run_hostile(tmp: Path, n_fuzz: int, rng: Any) -> list[Row]:
    rows = []
    counter = iter(range(10**9))

    def dst() -> Path:
        return tmp / f"h{next(counter)}.zarr"

    def nothing_left(res: Counter) -> Counter:
        res["left a staging dir"] += sum(1 for p in tmp.iterdir() if p.name.startswith(".h"))
        return res

    # Malformed CSR parts, built raw (scipy's checks bypassed).
    res: Counter[str] = Counter()
    for _ in range(n_fuzz):
        n_rows, n_cols, nnz = int(rng.integers(1, 6)), int(rng.integers(1, 6)), 6
        indptr = np.sort(rng.integers(0, nnz + 1, n_rows + 1))
        indptr[0], indptr[-1] = 0, nnz
        indices = rng.integers(0, n_cols, nnz).astype(np.int32)
        data = rng.random(nnz).astype(np.float32)
        fault = rng.integers(8)
        if fault == 0:
            indptr[1:] = indptr[1:][::-1]
        elif fault == 1:
            indices[0] = -1
        elif fault == 2:
            indices[-1] = n_cols + 5
        elif fault == 3:
            indptr = indptr.astype(np.float64)
            indptr[-1] = np.nan
        elif fault == 4:
            indices = indices[:-2]
        elif fault == 5:
            data = data.astype(object)
        elif fault == 6:
            indptr = indptr[:-1]
        else:
            indptr = indptr + 1
        m = sp.csr_matrix((n_rows, n_cols), dtype=np.float32)
        m.data, m.indices, m.indptr = data, indices, indptr
        d = dst()
        got = _outcome(lambda m=m, d=d: sparsestore.save(d, m))
        if got == "silent":  # a mutation that left valid parts: must round-trip exactly
            want = sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_cols))
            want.sum_duplicates()
            want.eliminate_zeros()
            got = "same" if (sparsestore.open(d)[:] != want).nnz == 0 else "silent"
        elif d.exists():
            got = "left a store"
        res[got] += 1
    rows.append(_row("Malformed or random CSR parts, raw scipy (save)", n_fuzz,
                     nothing_left(res), "refused with SparseStoreError or round-tripped "
                     "exactly, nothing left behind"))

    # Absurd and negative sizes.
    cases: list[Callable[[], Any]] = [
        lambda: sparsestore.save(dst(), _Fake((2**62, 3))),
        lambda: sparsestore.save(dst(), _Fake((-1, 3))),
        lambda: sparsestore.save(dst(), sp.coo_matrix(([1.0], ([0], [0])), shape=(2**62, 4))),
        lambda: sparsestore.create(dst(), n_cols=2**62),
        lambda: sparsestore.create(dst(), n_cols=-5),
        lambda: sparsestore.create(dst(), n_cols=2.5),
    ]
    rows.append(_row("Absurd / negative shapes (save, create)", len(cases),
                     Counter(_outcome(c) for c in cases), "refused with SparseStoreError"))

    # Pickles.
    from sparsestore.conversion import convert

    marker = tmp / "PWNED"
    obj = np.array([[_Marker(str(marker)), 1.0]], dtype=object)
    np.save(tmp / "evil.npy", obj, allow_pickle=True)
    np.savez(tmp / "evil.npz", obj)
    cases = [lambda: sparsestore.save(dst(), obj),
             lambda: sparsestore.save(dst(), np.ones((1, 2)), labels={"y": obj[0]}),
             lambda: convert(tmp / "evil.npy", dst()),
             lambda: convert(tmp / "evil.npz", dst())]
    res = Counter(_outcome(c) for c in cases)
    res["code ran"] += int(marker.exists())
    rows.append(_row("Pickled object arrays / .npy / .npz", len(cases), res,
                     "refused with SparseStoreError, no code run"))

    # Decompression bomb.
    forge.bomb(tmp / "bomb.npz", 2**28)
    size = (tmp / "bomb.npz").stat().st_size
    rows.append(_row(f"Decompression bomb (.npz, {size // 1024} KiB -> 256 MiB, limit 16 MiB)",
                     1, Counter([_outcome(lambda: convert(tmp / "bomb.npz", dst(),
                                                          max_bytes=2**24))]),
                     "refused with SparseStoreError"))

    # Stores whose metadata names code.
    good = tmp / "good.zarr"
    sparsestore.save(good, sp.random(50, 6, density=0.3, format="csr", random_state=0))
    edits = [
        ("zarr.json", lambda o: o["attributes"].update({"encoding-type": "os.system"})),
        ("zarr.json", lambda o: o["attributes"]["sparsestore"].update(format="pickle")),
        ("zarr.json", lambda o: o["attributes"]["sparsestore"].update(
            layout={"compressor": "__import__('os').system('id')"})),
        ("zarr.json", lambda o: o["attributes"]["sparsestore"].update(labels=["../../etc"])),
        ("zarr.json", lambda o: o["attributes"].update(shape=[2**62, 6])),
        ("data/zarr.json", lambda o: o.update(codecs=[o["codecs"][0], {"name": "os.system"}])),
        ("data/zarr.json", lambda o: o.update(codecs=[o["codecs"][0],
                                                      {"name": "numcodecs.pickle"}])),
        ("indptr/zarr.json", lambda o: o.update(data_type="object")),
    ]
    res = Counter()
    for rel, fn in edits:
        work = _copy(good, tmp / f"meta{next(counter)}.zarr")
        _edit_meta(work / rel, fn)
        res[_validated(work, _outcome(lambda w=work: sparsestore.open(w)))] += 1
    rows.append(_row("Store metadata naming code / codecs / bad shapes", len(edits), res,
                     "refused at open and by validate", _caught))

    # Second writer.
    path = tmp / "locked.zarr"
    st = sparsestore.create(path, n_cols=3)
    res = Counter()
    for fn in (lambda: sparsestore.open(path, mode="r+"),
               lambda: sparsestore.save(path, np.ones((1, 3)), overwrite=True)):
        res[_outcome(fn)] += 1
    code = ("import sys, sparsestore\nfrom sparsestore.errors import LockError\n"
            "try:\n    sparsestore.open(sys.argv[1], mode='r+')\nexcept LockError:\n"
            "    sys.exit(7)\n")
    rc = subprocess.run([sys.executable, "-c", code, str(path)], timeout=120).returncode
    res["refused: LockError" if rc == 7 else "silent"] += 1
    st.close()
    rows.append(_row("Second writer (same process, overwrite, other process)", 3, res,
                     "refused with LockError", lambda k: k == "refused: LockError"))
    return rows


# ------------------------------------------------------------- second pass


def _loader_rows(store: Any, **kw: Any) -> sp.csr_matrix:
    """A loader pass put back in row order."""
    rows, parts = [], []
    for b in sparsestore.DataLoader(store, batch_size=97, **kw).iter_batches():
        rows.append(b.rows)
        parts.append(b.to_scipy())
    order = np.argsort(np.concatenate(rows), kind="stable")
    return sp.vstack(parts, format="csr")[order]


def run_second_pass(tmp: Path, tries: int, rng: Any) -> list[Row]:
    """Restored backups under open handles, forged shard indexes and format fields, bad
    column indices, lossy casts, pickled handles, resumes over another layout, consolidated
    metadata, big-endian input, anndata size bombs and random ``zarr.json`` edits."""
    import google_crc32c
    import h5py
    import zarr

    n, m = 3000, 200
    X = _csr(n, m, 0.05, 1)
    y = np.arange(n, dtype=np.int64)
    lay = {"chunk_bytes": 4096, "indptr_chunk": 256}
    rows = []

    def fresh(name: str, **kw: Any) -> Path:
        path = tmp / name
        shutil.rmtree(path, ignore_errors=True)
        sparsestore.save(path, X, labels={"y": y}, **{**lay, **kw})
        return path

    def changed(k: str) -> bool:
        return k == "refused: StoreChangedError"

    # A backup restored under a handle opened after an append.
    res: Counter[str] = Counter()
    for t in range(tries):
        path, backup = tmp / "r.zarr", tmp / "r.bak"
        n0 = int(rng.integers(500, n - 500))
        shutil.rmtree(path, ignore_errors=True)
        sparsestore.save(path, X[:n0], labels={"y": y[:n0]}, **lay)
        _copy(path, backup)
        sparsestore.open(path, mode="r+").append(X[n0:], labels={"y": y[n0:]})
        h = sparsestore.open(path)
        _copy(backup, path)
        read = [lambda h=h, a=n0: h[a:], lambda h=h, a=n0: h[a - 3:a + 3],
                lambda h=h, a=n0: h.labels["y"][a:], lambda h=h: _loader_rows(h)][t % 4]
        res[_outcome(read)] += 1
    rows.append(_row("Backup restored under a handle opened after an append (reads past and "
                     "across the old end, labels, loader)", tries, res,
                     "refused with StoreChangedError", changed))

    # A shard index entry pointed at another inner chunk's bytes, CRC recomputed.
    sharded = fresh("sh.zarr", shard_bytes=16384)
    per = 16384 // 4096
    res = Counter()
    for t in range(tries):
        work = _copy(sharded, tmp / "shw.zarr")
        shard = sorted((work / ["data", "indices"][t % 2] / "c").glob("*"))[0]
        raw = bytearray(shard.read_bytes())
        size = per * 16 + 4
        index = np.frombuffer(bytes(raw[-size:-4]), "<u8").reshape(per, 2).copy()
        i, j = (int(v) for v in rng.choice(per, 2, replace=False))
        index[j] = index[i]
        body = index.tobytes()
        raw[-size:] = body + struct.pack("<I", google_crc32c.value(body))
        shard.write_bytes(bytes(raw))
        st = sparsestore.open(work)
        lo = int(X.indptr.searchsorted(j * 1024, side="right")) - 1
        read = [lambda st=st, lo=lo: st[lo:lo + 5], lambda st=st: _loader_rows(st),
                lambda st=st: st.to_dask(chunk_rows=500).compute()][t % 3]
        verdict = _outcome(read, X[lo:lo + 5] if t % 3 == 0 else X)
        if verdict.startswith("refused") and validate_store(work).ok:
            verdict = "silent"  # validate blessing what reads refuse
        res[verdict] += 1
    rows.append(_row("Shard index entry pointed at another inner chunk (index CRC "
                     "recomputed): row slice, loader, dask, validate", tries, res, "refused"))

    # One field that would turn verification off, then a moved chunk.
    res = Counter()
    for t in range(tries):
        path = fresh("f.zarr")
        c = path / "data" / "c"
        shutil.copyfile(c / "1", c / "0")
        g = zarr.open_group(str(path), mode="r+")
        if t % 2:
            g.attrs.__delitem__("sparsestore")
        else:
            g.attrs["sparsestore"] = {**g.attrs["sparsestore"], "format_version": 1}
        res[_outcome(lambda p=path: sparsestore.open(p)[:], X)] += 1
    rows.append(_row("format_version 2 -> 1, or attrs['sparsestore'] deleted, beside a "
                     "moved chunk", tries, res, "refused at open"))

    # Column indices out of range, negative, unsorted or duplicated (an unverified store).
    res = Counter()
    for t in range(tries):
        path = fresh("ix.zarr")
        forge.unseal(path)
        arr = zarr.open_array(str(path / "indices"), mode="r+")
        row = int(rng.integers(0, n))
        while X.indptr[row + 1] - X.indptr[row] < 2:
            row = (row + 1) % n
        a = int(X.indptr[row])
        ind = arr[a:a + 2]
        ind[:] = [[10**6, ind[1]], [-5, ind[1]], [ind[1], ind[0]], [ind[0], ind[0]]][t % 4]
        arr[a:a + 2] = ind
        st = sparsestore.open(path)
        read = [lambda st=st: st[:], lambda st=st, r=row: st[[r, 0]],
                lambda st=st: _loader_rows(st, shuffle=True, seed=1),
                lambda st=st: st.to_dask().compute()][t % 4]
        res[_outcome(read)] += 1
    rows.append(_row("Column index out of range / negative / unsorted / duplicated "
                     "(store without a manifest): full, rows, loader, dask", tries, res,
                     "refused"))

    # Lossy casts on save.
    res = Counter()
    casts = [(np.array([[300.0, 1.0]]), "int8"), (np.array([[0.7, 2.0]]), "int8"),
             (np.array([[-1.5, 3.0]]), "uint8"), (np.array([[1e300, 1.0]]), "float32"),
             (np.array([[70000.0, 1.0]]), "float16")]
    for k in range(tries):
        values, dt = casts[k % len(casts)]
        out = tmp / "cast.zarr"
        shutil.rmtree(out, ignore_errors=True)
        verdict = _outcome(lambda v=values, d=dt, o=out: sparsestore.save(
            o, sp.csr_matrix(v), dtype=d)[:])
        res["left a store" if out.exists() else verdict] += 1
    rows.append(_row("Lossy cast on save (300 -> int8, 0.7 -> int8, -1.5 -> uint8, 1e300 "
                     "-> float32, 70000 -> float16)", tries, res, "refused, nothing written"))

    # A pickled handle, after the store was saved over.
    res = Counter()
    for t in range(tries):
        path = fresh("p.zarr")
        blob = pickle.dumps(sparsestore.open(path))
        sparsestore.save(path, X[: n // (2 + t % 3)], labels={"y": y[: n // (2 + t % 3)]},
                         overwrite=True, **lay)
        res[_outcome(lambda b=blob: pickle.loads(b)[:])] += 1  # noqa: S301 - our own bytes
    rows.append(_row("Pickled handle loaded after the store was saved over", tries, res,
                     "refused with StoreChangedError", changed))

    # A shuffled resume state loaded over the same rows saved with another layout.
    res = Counter()
    for t in range(tries):
        a = fresh("la.zarr")
        b = tmp / "lb.zarr"
        shutil.rmtree(b, ignore_errors=True)
        sparsestore.save(b, X, labels={"y": y}, chunk_bytes=4096 * (2 + t % 3))
        la = sparsestore.DataLoader(sparsestore.open(a), 97, shuffle=True, seed=t)
        it = la.iter_batches()
        seen = [next(it).rows for _ in range(5)]
        state = la.state_dict()
        del it
        lb = sparsestore.DataLoader(sparsestore.open(b), 97, shuffle=True, seed=t)

        def resume(lb: Any = lb, state: dict = state, seen: list = seen) -> np.ndarray:
            lb.load_state_dict(state)
            return np.sort(np.concatenate([*seen, *(x.rows for x in lb.iter_batches())]))

        res[_outcome(resume, np.arange(n))] += 1
    rows.append(_row("Shuffled state resumed over a copy saved with another chunk size", tries,
                     res, "refused or every row exactly once"))

    # zarr.consolidate_metadata(), then append.
    res = Counter()
    for _ in range(max(2, tries // 4)):
        path = tmp / "c.zarr"
        shutil.rmtree(path, ignore_errors=True)
        sparsestore.save(path, X[:1000], labels={"y": y[:1000]}, **lay)
        zarr.consolidate_metadata(str(path))

        def append_then_read(path: Path = path) -> Any:
            sparsestore.open(path, mode="r+").append(X[1000:], labels={"y": y[1000:]})
            return sparsestore.open(path)[:]

        res[_outcome(append_then_read, X)] += 1
    rows.append(_row("zarr.consolidate_metadata() on a store, then append and reopen",
                     max(2, tries // 4), res, "appended and read back exactly",
                     lambda k: k == "same"))

    # Big-endian input.
    be = sp.csr_matrix(X[:500])
    be.data = be.data.astype(">f4")  # scipy refuses astype(">f4"); its constructors take it
    be_dense = be.toarray().astype(">f4")
    np.save(tmp / "be.npy", be_dense, allow_pickle=False)
    be_idx = sp.csr_matrix((X[:500].data, X[:500].indices.astype(">i4"), X[:500].indptr),
                           shape=(500, m))
    out = tmp / "be.zarr"
    saves = [lambda: sparsestore.save(out, be_dense)[:], lambda: sparsestore.save(out, be)[:],
             lambda: sparsestore.save(out, be_idx)[:],
             lambda: sparsestore.convert(tmp / "be.npy", out)[:]]
    res = Counter()
    for fn in saves:
        shutil.rmtree(out, ignore_errors=True)
        res[_outcome(fn, X[:500])] += 1
    rows.append(_row("Big-endian input (dense >f4, CSR >f4, indices >i4, convert .npy)",
                     len(saves), res, "read back exactly", lambda k: k == "same"))

    # anndata files declaring a 2^31 x 2^20 dense X in a few KB.
    h5 = tmp / "bomb.h5ad"
    with h5py.File(h5, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        f.create_dataset("X", shape=(2**31, 2**20), dtype="f4", chunks=(64, 64),
                         fillvalue=0, compression="gzip")
    zb = tmp / "bomb.zarr"
    g = zarr.open_group(str(zb), mode="w", zarr_format=3)
    g.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    g.create_array("X", shape=(2**31, 2**20), dtype="f4", chunks=(1024, 1024), fill_value=0)
    res = Counter()
    for src in (h5, zb):
        out = tmp / "bo.zarr"
        verdict = _outcome(lambda s=src, o=out: sparsestore.convert(s, o))
        res["left a store" if out.exists() else verdict] += 1
    rows.append(_row("anndata .h5ad / zarr declaring a 2^31 x 2^20 dense X in a few KB", 2,
                     res, "refused up front"))

    # Random edits of any zarr.json field (the property test's edits, drawn here with numpy).
    res = Counter()
    tx = _csr(tt.N_ROWS, tt.N_COLS, 0.1, 7)
    ty = np.repeat(np.arange(6), tt.N_ROWS // 6).astype(np.int64)
    for layout, options in tt.LAYOUTS.items():
        src = tmp / f"tamper-{layout}"
        sparsestore.save(src, tx, labels={"y": ty}, **options)
        for _ in range(tries):
            work = _copy(src, tmp / "tw.zarr")
            files = sorted(work.rglob("zarr.json"))
            target = files[int(rng.integers(len(files)))]
            leaves = tt._leaves(json.loads(target.read_text()))
            tt._edit_json(target, leaves[int(rng.integers(len(leaves)))],
                          int(rng.integers(8)), bool(rng.integers(2)))
            res[_tamper_outcome(work, tx, ty)] += 1
    rows.append(_row("Random edit of one zarr.json field (chunked and sharded stores): every "
                     "read path", len(tt.LAYOUTS) * tries, res, "refused or read back exactly"))
    return rows


def _tamper_outcome(path: Path, X: sp.csr_matrix, y: np.ndarray) -> str:
    """'refused' when open or any read path raised (and validate fails), 'same' when every
    path read back exactly, else 'silent'."""
    try:
        tt._check(path, X, y)
    except AssertionError:
        return "silent"
    try:
        sparsestore.open(path)
        return "same" if validate_store(path).ok else "refused"
    except SparseStoreError:
        return "refused"


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer faults (about a minute)")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    kills, flips, fuzz = (20, 10, 80) if args.quick else (60, 40, 400)
    rng = np.random.default_rng(2024)
    t0 = time.monotonic()
    rows: list[Row] = []
    runs = [(run_kills, kills), (run_flips, flips), (run_damage, flips),
            (run_environment, max(6, flips // 2)), (run_hostile, fuzz),
            (run_second_pass, max(8, flips // 2))]
    with tempfile.TemporaryDirectory(prefix="reliability-") as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn, n in runs:
            (Path(d) / fn.__name__).mkdir()
            rows += fn(Path(d) / fn.__name__, n, rng)
    records = [{"group": "", "Category": a, "Faults / inputs tried": b, "Outcome": c}
               for a, b, c in rows]
    meta = run_meta("python -m benchmarks reliability" + (" --quick" if args.quick else ""),
                    title="Reliability: faults and hostile input",
                    note=f"Every row: how many faults or inputs were tried and how many ended "
                         f"as the library promises; anything else is in bold.  "
                         f"{'--quick' if args.quick else 'Full'} run, "
                         f"{time.monotonic() - t0:.0f} s.")
    write_records("reliability", records, meta, args.out)
    return 1 if any("**" in c for _, _, c in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
