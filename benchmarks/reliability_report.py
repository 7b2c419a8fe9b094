"""Reliability report: inject faults and hostile input, tabulate what happened.

``python -m benchmarks reliability [--quick] [--out DIR]`` SIGKILLs writers during save,
append and convert, flips bytes in every kind of chunk, and feeds malformed and hostile
input; it writes a markdown table to ``DIR/reliability.md`` (default ``benchmarks/out``;
``--out benchmarks/results`` replaces the committed one) and prints it.  The fault drivers
and oracles are the tests' own: :mod:`benchmarks.crash_worker`, :mod:`benchmarks.forge`,
:mod:`benchmarks.tamper`.  Every row
states how many faults or inputs were tried and how many ended as the library promises
(no store or exactly the committed rows; ChecksumError and a failed validate; a
SparseStoreError with nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

import sparsestore
from sparsestore.errors import (
    CorruptStoreError,
    LockError,
    SparseStoreError,
    StoreChangedError,
)
from sparsestore.validate import validate_store

from . import crash_worker as cw
from . import forge
from . import tamper as tt
from .common import add_out_argument

ROOT = Path(__file__).resolve().parents[1]

PARALLEL = 3


# ------------------------------------------------------------------ kills

def _full_ok(dst: Path, n_blocks: int, labels: bool) -> bool:
    store = sparsestore.open(dst)
    X, labs = cw.blocks(0, n_blocks)
    if store.shape != X.shape or (store[:] != X).nnz:
        return False
    if labels and any(not np.array_equal(store.labels[k][:], v) for k, v in labs.items()):
        return False
    return validate_store(dst).ok


def check_job(job: dict) -> str:
    """``"absent"``, ``"complete"``, ``"k/n"`` blocks committed, or ``"FAIL: ..."``."""
    dst = Path(job["path"])
    side = Path(job["side"])
    lines = side.read_text().splitlines() if side.exists() else []
    try:
        if job["op"] in ("save", "convert"):
            if not dst.exists():
                for p in dst.parent.iterdir():  # orphaned staging dirs must not open partial
                    if p.name.startswith(f".{dst.name}."):
                        try:
                            sparsestore.open(p)
                        except SparseStoreError:
                            continue
                        if not _full_ok(p, job["n_blocks"], job["op"] == "save"):
                            return "FAIL: partial staging dir opens"
                return "absent"
            ok = _full_ok(dst, job["n_blocks"], job["op"] == "save")
            return "complete" if ok else "FAIL: store differs"
        reported = max([int(x.split()[1]) // cw.ROWS for x in lines if x.startswith("COMMITTED")]
                       + [job["start"]])
        k = cw.check_prefix(sparsestore.open(dst), job["stop"])
        if k not in (reported, reported + 1) or not validate_store(dst).ok:
            return f"FAIL: {k} blocks, {reported} reported"
        with sparsestore.open(dst, mode="r+") as st:  # lock freed, tail cut, appends go on
            st.append(*cw.block(k))
        if cw.check_prefix(sparsestore.open(dst), k + 1) != k + 1:
            return "FAIL: append after the kill"
        return f"{k - job['start']}/{job['stop'] - job['start']}"
    except Exception as exc:
        return f"FAIL: {type(exc).__name__}: {exc}"


def run_kills(tmp: Path, kills_per_op: int, rng: Any) -> list[tuple[str, str, str]]:
    server = cw.Server()
    rows = []
    try:
        shard_dir = tmp / "shards"
        shard_dir.mkdir()
        shards = []
        for s in range(0, 60, 10):
            p = shard_dir / f"part{s:03d}.npz"
            sp.save_npz(p, cw.blocks(s, s + 10)[0])
            shards.append(str(p))
        tpl = tmp / "tpl.zarr"
        st = sparsestore.create(tpl, n_cols=cw.COLS, dtype=np.float32, **cw.LAYOUT)
        st.append(*cw.blocks(0, 3))
        st.close()
        counter = iter(range(10**9))

        def job(op: str) -> dict:
            d = tmp / f"k{next(counter)}"
            d.mkdir()
            base = {"path": str(d / "s.zarr"), "side": str(d / "side.txt"), "op": op}
            if op == "append":
                shutil.copytree(tpl, d / "s.zarr")
                return {**base, "start": 3, "stop": 9}
            if op == "convert":
                return {**base, "src": shards, "n_blocks": 60}
            return {**base, "n_blocks": 60}

        for op in ("save", "append", "convert"):
            if op == "convert" and not _has_convert():
                rows.append(("Kill -9 during convert", "0", "skipped: no sparsestore.convert"))
                continue
            calib = cw.run_batch(server, [job(op) for _ in range(PARALLEL)], None, rng,
                                 check_exit=False)
            window = 1.1 * max(j["seconds"] for j in calib)
            outcomes: Counter[str] = Counter()
            kills = 0
            for _ in range(200):
                if kills >= kills_per_op:
                    break
                for j in cw.run_batch(server, [job(op) for _ in range(PARALLEL)], window,
                                      rng, check_exit=False):
                    if j["killed"]:
                        kills += 1
                        outcomes[check_job(j)] += 1
                    shutil.rmtree(Path(j["path"]).parent, ignore_errors=True)
            fails = sum(v for k, v in outcomes.items() if k.startswith("FAIL"))
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))
            verdict = "all consistent" if not fails else f"**{fails} INCONSISTENT**"
            rows.append((f"Kill -9 during {op}", str(kills), f"{verdict} ({detail})"))
    finally:
        server.close()
    return rows


def _has_convert() -> bool:
    import importlib.util

    return importlib.util.find_spec("sparsestore.conversion") is not None


# ------------------------------------------------------------- corruption

def run_flips(tmp: Path, flips_per_array: int, rng: Any) -> list[tuple[str, str, str]]:
    n = 2000
    X = sp.random(n, 60, density=0.1, format="csr", dtype=np.float32, random_state=7)
    labels = {"y": np.arange(n), "w": np.ones((n, 2), np.float32)}
    sparsestore.save(tmp / "s.zarr", X, labels=labels, chunk_bytes=2048, indptr_chunk=128,
                     dense_chunk_bytes=2048)
    sparsestore.save(tmp / "sh.zarr", X, chunk_bytes=2048, shard_bytes=8192)
    D = np.arange(n * 12, dtype=np.float32).reshape(n, 12)
    sparsestore.save(tmp / "d.zarr", D, sparse=False, dense_chunk_bytes=2048)
    cases = [("s.zarr", "data"), ("s.zarr", "indices"), ("s.zarr", "indptr"),
             ("s.zarr", "labels/y"), ("s.zarr", "labels/w"), ("sh.zarr", "data"),
             ("d.zarr", "X")]
    rows = []
    for store_name, array in cases:
        files = sorted(p for p in (tmp / store_name / array / "c").rglob("*") if p.is_file())
        read_detected = validate_detected = silent = 0
        for t in range(flips_per_array):
            work = tmp / f"flip{t}.zarr"
            shutil.copytree(tmp / store_name, work)
            victim = work / files[int(rng.integers(len(files)))].relative_to(tmp / store_name)
            raw = bytearray(victim.read_bytes())
            raw[int(rng.integers(len(raw)))] ^= int(rng.integers(1, 256))
            victim.write_bytes(bytes(raw))
            try:
                _read_back(work, array)
                silent += 1
            except CorruptStoreError:  # ChecksumError, or a damaged tag: MisplacedChunkError
                read_detected += 1
            if not validate_store(work).ok:
                validate_detected += 1
            shutil.rmtree(work)
        kind = {"sh.zarr": " (sharded)", "d.zarr": " (dense)"}.get(store_name, "")
        outcome = (f"read raised ChecksumError/MisplacedChunkError {read_detected}/"
                   f"{flips_per_array}, validate failed {validate_detected}/{flips_per_array}, "
                   f"silently wrong {silent}")
        rows.append((f"Byte flip in `{array}` chunk{kind}", str(flips_per_array), outcome))
    return rows


def _read_back(path: Path, array: str) -> None:
    """Read everything ``array`` holds (a label, or the matrix)."""
    st = sparsestore.open(path)
    if array.startswith("labels/"):
        st.labels[array.split("/")[1]][:]
    else:
        st[:]


def _chunk_files(store: Path, array: str) -> list[Path]:
    return sorted(p for p in (store / array / "c").rglob("*") if p.is_file())


def run_damage(tmp: Path, tries: int, rng: Any) -> list[tuple[str, str, str]]:
    """Chunks deleted, moved, or copied in from another store; array metadata edited; a
    store saved over while a reader has it open."""
    n, m = 4000, 300
    X = sp.random(n, m, density=0.05, format="csr", dtype=np.float32, random_state=0)
    X.data += 1
    Y = sp.random(n, m, density=0.05, format="csr", dtype=np.float32, random_state=5)
    Y.data += 1
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
    rows = []

    def attempt(store_name: str, array: str, damage) -> str:
        work = tmp / "work.zarr"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(tmp / store_name, work)
        damage(work)
        try:
            st = sparsestore.open(work)
            got = st.labels["y"][:] if array == "labels/y" else st[:]
            want = labels["y"] if array == "labels/y" else truth[store_name]
            same = np.array_equal(got, want) if isinstance(got, np.ndarray) else \
                (got != want).nnz == 0
            verdict = "same" if same else "silent"
        except CorruptStoreError as exc:
            verdict = type(exc).__name__
        if not validate_store(work).ok:
            verdict += "+validate"
        shutil.rmtree(work)
        return verdict

    def row(label: str, results: Counter) -> None:
        total = sum(results.values())
        silent = sum(v for k, v in results.items() if k.startswith("silent"))
        caught = sum(v for k, v in results.items() if k.endswith("+validate")
                     and not k.startswith(("silent", "same")))
        kinds = ", ".join(f"{k.split('+')[0]}: {v}" for k, v in sorted(results.items()))
        outcome = (f"read raised and validate failed {caught}/{total} ({kinds}), silently "
                   f"wrong {silent}")
        if silent or caught != total:
            outcome = f"**{outcome}**"
        rows.append((label, str(total), outcome))

    kind = {"sh.zarr": " (sharded)", "d.zarr": " (dense)", "kz.zarr": " (keep_zeros)",
            "nc.zarr": " (checksum=False)"}
    for store_name, array in cases:
        files = _chunk_files(tmp / store_name, array)
        res: Counter = Counter()
        for _ in range(tries):
            victim = files[int(rng.integers(len(files)))].relative_to(tmp / store_name)
            res[attempt(store_name, array, lambda w, v=victim: (w / v).unlink())] += 1
        row(f"Chunk file deleted: `{array}`{kind.get(store_name, '')}", res)
    for store_name, array in cases:
        files = _chunk_files(tmp / store_name, array)
        res = Counter()
        for t in range(tries):
            a, b = (int(i) for i in rng.choice(len(files), 2, replace=False))
            src_rel, dst_rel = (f.relative_to(tmp / store_name) for f in (files[a], files[b]))
            other = tmp / "o.zarr" / dst_rel
            how = t % 3 if store_name == "s.zarr" and other.exists() else 0

            def damage(w, s=src_rel, d=dst_rel, how=how, other=other):
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

    def meta_edit(array: str, fn):
        def damage(w):
            f = w / array / "zarr.json"
            meta = json.loads(f.read_text())
            fn(meta)
            f.write_text(json.dumps(meta))
        return damage

    def grid(shape):
        return lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=shape)

    def shape_attr(w):
        f = w / "zarr.json"
        meta = json.loads(f.read_text())
        meta["attributes"]["shape"] = [n, m + 50]
        f.write_text(json.dumps(meta))

    edits = [
        ("data", meta_edit("data", lambda m: m.update(data_type="int32"))),
        ("data", meta_edit("data", lambda m: m.update(data_type="uint32"))),
        ("data", meta_edit("data", lambda m: m["codecs"][0]["configuration"].update(
            endian="big"))),
        ("labels/y", meta_edit("labels/y", lambda m: m.update(data_type="float64"))),
        ("data", meta_edit("data", lambda m: m.update(codecs=m["codecs"][:-1]))),
        ("data", meta_edit("data", grid([2048]))),
        ("data", meta_edit("data", grid([2**40]))),
        ("data", shape_attr),
    ]
    res = Counter(attempt("s.zarr", a, fn) for a, fn in edits)
    row("Array metadata edited (dtype, endian, labels dtype, codecs, chunk shape, n_cols)", res)

    res = Counter()
    for rows_b in (n // 4, n, 2 * n):
        shutil.rmtree(tmp / "ow.zarr", ignore_errors=True)
        sparsestore.save(tmp / "ow.zarr", X, labels=labels, **lay)
        old = sparsestore.open(tmp / "ow.zarr")
        B = sp.random(rows_b, m, density=0.05, format="csr", dtype=np.float32, random_state=9)
        sparsestore.save(tmp / "ow.zarr", B, labels={"y": np.zeros(rows_b, np.int64)},
                         overwrite=True, **lay)
        for read in (lambda o=old: o[:], lambda o=old: o.labels["y"][:]):
            try:
                read()
                res["silent"] += 1
            except StoreChangedError:
                res["refused"] += 1
    total = sum(res.values())
    outcome = (f"{res['refused']}/{total} reads (matrix, labels) raised StoreChangedError, "
               f"silently wrong {res['silent']}")
    rows.append(("Store saved over while a reader has it open (B smaller, equal, larger)",
                 str(total), outcome if not res["silent"] else f"**{outcome}**"))
    return rows


# ------------------------------------------------------------ environment

def _du(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _digest(root: Path) -> dict[str, str]:
    import hashlib

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


def run_environment(tmp: Path, tries: int, rng: Any) -> list[tuple[str, str, str]]:
    """Appends that run out of disk space (a zarr write budget) or past RLIMIT_FSIZE: the
    error is a SparseStoreError that is also the OSError, and the store is byte for byte
    what it was (space given back), or the append fit and every row reads back."""
    import zarr.storage._local as local

    from sparsestore.errors import DiskFullError

    n, m = 2000, 200
    X = sp.random(n, m, density=0.05, format="csr", dtype=np.float32, random_state=1)
    B = sp.random(6000, m, density=0.05, format="csr", dtype=np.float32, random_state=2)
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
            return "appended" if (st[:] != both).nnz == 0 else "damaged"
        return outcome

    res: Counter = Counter()
    put = local._put
    for _ in range(tries):
        work = tmp / "full.zarr"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(base, work)
        before = _digest(work)
        cap = _du(work) + int(rng.integers(0, 300_000))  # a file system with that much free

        def limited(path, value, exclusive=False, work=work, cap=cap):
            path = Path(path)
            if work in path.parents:
                old = path.stat().st_size if path.exists() else 0
                if _du(work) - old + len(value) > cap:
                    raise OSError(28, os.strerror(28), str(path))
            return put(path, value, exclusive)

        local._put = limited
        try:
            with sparsestore.open(work, "r+") as st:
                st.append(B, labels={"y": np.arange(n, n + B.shape[0])})
            outcome = "appended"
        except DiskFullError as exc:
            outcome = "refused" if exc.errno == 28 else "wrong errno"
        except Exception as exc:
            outcome = type(exc).__name__
        finally:
            local._put = put
        res[verdict(work, before, outcome)] += 1
    rows = [("Disk full during append (ENOSPC at a random point)", str(tries),
             _env_outcome(res, "DiskFullError"))]

    res = Counter()
    for _ in range(tries):
        work = tmp / "fsize.zarr"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(base, work)
        before = _digest(work)
        limit = int(rng.integers(20_000, 300_000))
        proc = subprocess.run([sys.executable, "-c", _EFBIG_CHILD, str(work),
                               str(tmp / "big.npz"), str(limit)],
                              capture_output=True, text=True, timeout=300)
        outcome = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 \
            else f"exit {proc.returncode}"
        res[verdict(work, before, outcome)] += 1
    rows.append(("File-size limit during append (RLIMIT_FSIZE, random limit)", str(tries),
                 _env_outcome(res, "FileTooLargeError")))
    return rows


def _env_outcome(res: Counter, cls: str) -> str:
    total = sum(res.values())
    bad = {k: v for k, v in res.items() if k not in ("refused", "appended")}
    text = (f"{res['refused']}/{total} raised {cls} (an OSError, errno kept) with the store "
            f"byte-identical to before, {res['appended']}/{total} fit and read back exactly")
    if bad:
        text += "; " + ", ".join(f"**{k}: {v}**" for k, v in sorted(bad.items()))
    return text


# ---------------------------------------------------------- hostile input

def _refused(fn) -> str:
    try:
        fn()
    except SparseStoreError:
        return "refused"
    except Exception as exc:
        return f"other: {type(exc).__name__}"
    return "accepted"


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def run_hostile(tmp: Path, n_fuzz: int, rng: Any) -> list[tuple[str, str, str]]:
    rows = []
    counter = iter(range(10**9))

    def dst() -> Path:
        return tmp / f"h{next(counter)}.zarr"

    def leftovers() -> int:
        return sum(1 for p in tmp.iterdir() if p.name.startswith(".h"))

    # Malformed CSR parts, built raw (scipy's checks bypassed).
    results: Counter[str] = Counter()
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
        got = _refused(lambda m=m, d=d: sparsestore.save(d, m))
        if got == "accepted":  # a mutation that left valid parts: must round-trip exactly
            want = sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_cols))
            want.sum_duplicates()
            want.eliminate_zeros()
            same = (sparsestore.open(d)[:] != want).nnz == 0
            got = "refused" if same else "accepted but differs"
            results["round-tripped"] += same
        elif d.exists():
            results["left a store"] += 1
        results[got] += 1
    results["left a staging dir"] += leftovers()
    rows.append(("Malformed or random CSR parts, raw scipy (save)", str(n_fuzz),
                 _fmt(results, n_fuzz,
                      ok="refused with SparseStoreError or round-tripped exactly")))

    # Absurd and negative sizes.
    class Fake:
        dtype = np.dtype(np.float32)

        def __init__(self, shape):
            self.shape = shape

        def __array__(self, *a, **k):
            raise AssertionError("materialised")

    cases = [
        lambda: sparsestore.save(dst(), Fake((2**62, 3))),
        lambda: sparsestore.save(dst(), Fake((-1, 3))),
        lambda: sparsestore.save(dst(), sp.coo_matrix(([1.0], ([0], [0])), shape=(2**62, 4))),
        lambda: sparsestore.create(dst(), n_cols=2**62),
        lambda: sparsestore.create(dst(), n_cols=-5),
        lambda: sparsestore.create(dst(), n_cols=2.5),
    ]
    res = Counter(_refused(c) for c in cases)
    rows.append(("Absurd / negative shapes (save, create)", str(len(cases)), _fmt(res, len(cases))))

    # Pickles.
    marker = tmp / "PWNED"
    obj = np.array([[_Marker(str(marker)), 1.0]], dtype=object)
    cases = [lambda: sparsestore.save(dst(), obj),
             lambda: sparsestore.save(dst(), np.ones((1, 2)), labels={"y": obj[0]})]
    if _has_convert():
        from sparsestore.conversion import convert

        np.save(tmp / "evil.npy", obj, allow_pickle=True)
        np.savez(tmp / "evil.npz", obj)
        cases += [lambda: convert(tmp / "evil.npy", dst()),
                  lambda: convert(tmp / "evil.npz", dst())]
    res = Counter(_refused(c) for c in cases)
    res["code ran"] += int(marker.exists())
    rows.append(("Pickled object arrays / .npy / .npz", str(len(cases)), _fmt(res, len(cases))))

    # Decompression bomb.
    if _has_convert():
        from sparsestore.conversion import convert

        forge.bomb(tmp / "bomb.npz", 2**28)
        res = Counter([_refused(lambda: convert(tmp / "bomb.npz", dst(), max_bytes=2**24))])
        size = (tmp / "bomb.npz").stat().st_size
        rows.append((f"Decompression bomb (.npz, {size // 1024} KiB -> 256 MiB, limit 16 MiB)",
                     "1", _fmt(res, 1)))

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
        work = tmp / f"meta{next(counter)}.zarr"
        shutil.copytree(good, work)
        obj_ = json.loads((work / rel).read_text())
        fn(obj_)
        (work / rel).write_text(json.dumps(obj_))
        res[_refused(lambda w=work: sparsestore.open(w))] += 1
        try:
            if validate_store(work).ok:
                res["validate passed"] += 1
        except SparseStoreError:
            pass
    rows.append(("Store metadata naming code / codecs / bad shapes", str(len(edits)),
                 _fmt(res, len(edits))))

    # Second writer.
    path = tmp / "locked.zarr"
    st = sparsestore.create(path, n_cols=3)
    res = Counter()
    for fn in (lambda: sparsestore.open(path, mode="r+"),
               lambda: sparsestore.save(path, np.ones((1, 3)), overwrite=True)):
        try:
            fn()
            res["accepted"] += 1
        except LockError:
            res["refused"] += 1
    code = ("import sys, sparsestore\nfrom sparsestore.errors import LockError\n"
            "try:\n    sparsestore.open(sys.argv[1], mode='r+')\nexcept LockError:\n"
            "    sys.exit(7)\n")
    rc = subprocess.run([sys.executable, "-c", code, str(path)], timeout=120).returncode
    res["refused" if rc == 7 else "accepted"] += 1
    st.close()
    rows.append(("Second writer (same process, overwrite, other process)", "3",
                 _fmt(res, 3, ok="refused with LockError")))
    return rows


def _fmt(res: Counter, total: int, ok: str = "refused with SparseStoreError") -> str:
    good = res.get("refused", 0)
    bad = {k: v for k, v in res.items() if k not in ("refused", "round-tripped") and v}
    text = f"{good}/{total} {ok}"
    if res.get("round-tripped"):
        text += f" ({res['round-tripped']} valid after mutation, equal to scipy)"
    if bad:
        text += "; " + ", ".join(f"**{k}: {v}**" for k, v in sorted(bad.items()))
    else:
        text += ", nothing written, no code run"
    return text


# ------------------------------------------------------------- second pass

def _outcome(read, want=None) -> str:
    """'refused: Class' for a SparseStoreError, 'same' when ``read()`` equals ``want``,
    'silent' when it differs, 'raw: Class' for any other exception."""
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


def _tally(label: str, res: Counter, ok: str,
           good: tuple[str, ...] = ("refused", "same")) -> tuple[str, str, str]:
    """A row: how many ended as promised (outcomes starting with one of ``good``; ``ok``
    says which), the rest in bold."""
    total = sum(res.values())
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(res.items()))
    bad = sum(v for k, v in res.items() if not k.startswith(good) or "(written)" in k)
    text = f"{total - bad}/{total} {ok} ({kinds}), silently wrong {res.get('silent', 0)}"
    return label, str(total), f"**{text}**" if bad else text


def _loader_rows(store: Any, **kw: Any) -> sp.csr_matrix:
    """A loader pass put back in row order."""
    rows, parts = [], []
    for b in sparsestore.DataLoader(store, batch_size=97, **kw).iter_batches():
        rows.append(b.rows)
        parts.append(b.to_scipy())
    order = np.argsort(np.concatenate(rows), kind="stable")
    return sp.vstack(parts, format="csr")[order]


def run_second_pass(tmp: Path, tries: int, rng: Any) -> list[tuple[str, str, str]]:
    """Restored backups under open handles, forged shard indexes and format fields, bad
    column indices, lossy casts, pickled handles, resumes over another layout, consolidated
    metadata, big-endian input and anndata size bombs."""
    import pickle
    import warnings

    import zarr

    warnings.simplefilter("ignore")
    n, m = 3000, 200
    X = sp.random(n, m, density=0.05, format="csr", dtype=np.float32, random_state=1)
    X.data += 1
    y = np.arange(n, dtype=np.int64)
    lay = {"chunk_bytes": 4096, "indptr_chunk": 256}
    rows = []

    def fresh(name: str, **kw: Any) -> Path:
        path = tmp / name
        shutil.rmtree(path, ignore_errors=True)
        sparsestore.save(path, X, labels={"y": y}, **{**lay, **kw})
        return path

    # A backup restored under a handle opened after an append.
    res: Counter = Counter()
    for t in range(tries):
        path, backup = tmp / "r.zarr", tmp / "r.bak"
        n0 = int(rng.integers(500, n - 500))
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(backup, ignore_errors=True)
        sparsestore.save(path, X[:n0], labels={"y": y[:n0]}, **lay)
        shutil.copytree(path, backup)
        sparsestore.open(path, mode="r+").append(X[n0:], labels={"y": y[n0:]})
        h = sparsestore.open(path)
        shutil.rmtree(path)
        shutil.copytree(backup, path)
        read = [lambda h=h, a=n0: h[a:], lambda h=h, a=n0: h[a - 3:a + 3],
                lambda h=h, a=n0: h.labels["y"][a:], lambda h=h: _loader_rows(h)][t % 4]
        res[_outcome(read)] += 1
    rows.append(_tally("Backup restored under a handle opened after an append (reads past and "
                       "across the old end, labels, loader)", res, "refused with "
                       "StoreChangedError", good=("refused: StoreChangedError",)))

    # A shard index entry pointed at another inner chunk's bytes, CRC recomputed.
    import struct

    import google_crc32c

    sharded = fresh("sh.zarr", shard_bytes=16384)
    per = 16384 // 4096
    res = Counter()
    for t in range(tries):
        work = tmp / "shw.zarr"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(sharded, work)
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
        want = X[lo:lo + 5] if t % 3 == 0 else X
        verdict = _outcome(read, want)
        if verdict.startswith("refused") and validate_store(work).ok:
            verdict = "silent"  # validate blessing what reads refuse
        res[verdict] += 1
    rows.append(_tally("Shard index entry pointed at another inner chunk (index CRC "
                       "recomputed): row slice, loader, dask, validate", res, "refused"))

    # One field that would turn verification off, then a moved chunk.
    res = Counter()
    for t in range(tries):
        path = fresh("f.zarr")
        c = path / "data" / "c"
        shutil.copyfile(c / "1", c / "0")
        g = zarr.open_group(str(path), mode="r+")
        meta = dict(g.attrs["sparsestore"])
        if t % 2:
            g.attrs.__delitem__("sparsestore")
        else:
            meta["format_version"] = 1
            g.attrs["sparsestore"] = meta
        res[_outcome(lambda p=path: sparsestore.open(p)[:], X)] += 1
    rows.append(_tally("format_version 2 -> 1, or attrs['sparsestore'] deleted, beside a "
                       "moved chunk", res, "refused at open"))

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
    rows.append(_tally("Column index out of range / negative / unsorted / duplicated "
                       "(store without a manifest): full, rows, loader, dask", res,
                       "refused"))

    # Lossy casts on save, and from_dask's claimed dtype.
    res = Counter()
    cases = [(np.array([[300.0, 1.0]]), "int8"), (np.array([[0.7, 2.0]]), "int8"),
             (np.array([[-1.5, 3.0]]), "uint8"), (np.array([[1e300, 1.0]]), "float32"),
             (np.array([[70000.0, 1.0]]), "float16")]
    for k in range(tries):
        values, dt = cases[k % len(cases)]
        out = tmp / "cast.zarr"
        shutil.rmtree(out, ignore_errors=True)
        verdict = _outcome(lambda v=values, d=dt, o=out: sparsestore.save(
            o, sp.csr_matrix(v), dtype=d)[:])
        if out.exists():
            verdict += " (written)"
        res[verdict] += 1
    rows.append(_tally("Lossy cast on save (300 -> int8, 0.7 -> int8, -1.5 -> uint8, 1e300 "
                       "-> float32, 70000 -> float16)", res, "refused, nothing written"))

    # A pickled handle, after the store was saved over.
    res = Counter()
    for t in range(tries):
        path = fresh("p.zarr")
        h = sparsestore.open(path)
        blob = pickle.dumps(h)
        sparsestore.save(path, X[: n // (2 + t % 3)], labels={"y": y[: n // (2 + t % 3)]},
                         overwrite=True, **lay)
        res[_outcome(lambda b=blob: pickle.loads(b)[:])] += 1  # noqa: S301 - our own bytes
    rows.append(_tally("Pickled handle loaded after the store was saved over", res,
                       "refused with StoreChangedError", good=("refused: StoreChangedError",)))

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

        def resume(lb=lb, state=state, seen=seen):
            lb.load_state_dict(state)
            got = np.concatenate([*seen, *(x.rows for x in lb.iter_batches())])
            return np.sort(got)

        res[_outcome(resume, np.arange(n))] += 1
    rows.append(_tally("Shuffled state resumed over a copy saved with another chunk size",
                       res, "refused or every row exactly once"))

    # zarr.consolidate_metadata(), then append.
    res = Counter()
    for _ in range(max(2, tries // 4)):
        path = tmp / "c.zarr"
        shutil.rmtree(path, ignore_errors=True)
        sparsestore.save(path, X[:1000], labels={"y": y[:1000]}, **lay)
        zarr.consolidate_metadata(str(path))

        def append_then_read(path=path):
            sparsestore.open(path, mode="r+").append(X[1000:], labels={"y": y[1000:]})
            return sparsestore.open(path)[:]

        res[_outcome(append_then_read, X)] += 1
    rows.append(_tally("zarr.consolidate_metadata() on a store, then append and reopen", res,
                       "appended and read back exactly", good=("same",)))

    # Big-endian input.
    res = Counter()
    be = sp.csr_matrix(X[:500])
    be.data = be.data.astype(">f4")  # scipy refuses astype(">f4"); its constructors take it
    be_dense = be.toarray().astype(">f4")
    npy = tmp / "be.npy"
    np.save(npy, be_dense, allow_pickle=False)
    for how in ("dense", "csr", "indices", "convert"):
        out = tmp / "be.zarr"
        shutil.rmtree(out, ignore_errors=True)
        if how == "dense":
            res[_outcome(lambda o=out: sparsestore.save(o, be_dense)[:], X[:500])] += 1
        elif how == "csr":
            res[_outcome(lambda o=out: sparsestore.save(o, be)[:], X[:500])] += 1
        elif how == "indices":
            Z = sp.csr_matrix((X[:500].data, X[:500].indices.astype(">i4"), X[:500].indptr),
                              shape=(500, m))
            res[_outcome(lambda o=out, Z=Z: sparsestore.save(o, Z)[:], X[:500])] += 1
        else:
            res[_outcome(lambda o=out: sparsestore.convert(npy, o)[:], X[:500])] += 1
    rows.append(_tally("Big-endian input (dense >f4, CSR >f4, indices >i4, convert .npy)",
                       res, "read back exactly", good=("same",)))

    # anndata files declaring a 2^31 x 2^20 dense X in a few KB.
    import h5py

    res = Counter()
    h5 = tmp / "bomb.h5ad"
    with h5py.File(h5, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        f.create_dataset("X", shape=(2**31, 2**20), dtype="f4", chunks=(64, 64),
                         fillvalue=0, compression="gzip")
    zb = tmp / "bomb.zarr"
    g = zarr.open_group(str(zb), mode="w", zarr_format=3)
    g.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    g.create_array("X", shape=(2**31, 2**20), dtype="f4", chunks=(1024, 1024), fill_value=0)
    for src in (h5, zb):
        out = tmp / "bo.zarr"
        verdict = _outcome(lambda s=src, o=out: sparsestore.convert(s, o))
        res[verdict + (" (written)" if out.exists() else "")] += 1
    rows.append(_tally("anndata .h5ad / zarr declaring a 2^31 x 2^20 dense X in a few KB",
                       res, "refused up front"))
    # Random edits of any zarr.json field (the property test's edits, drawn here with numpy).
    res = Counter()
    tx, ty = _tamper_matrix(tt), np.repeat(np.arange(6), tt.N_ROWS // 6).astype(np.int64)
    for layout, options in tt.LAYOUTS.items():
        src = tmp / f"tamper-{layout}"
        sparsestore.save(src, tx, labels={"y": ty}, **options)
        for _ in range(tries):
            work = tmp / "tw.zarr"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(src, work)
            files = sorted(work.rglob("zarr.json"))
            target = files[int(rng.integers(len(files)))]
            leaves = tt._leaves(json.loads(target.read_text()))
            tt._edit_json(target, leaves[int(rng.integers(len(leaves)))],
                          int(rng.integers(8)), bool(rng.integers(2)))
            res[_tamper_outcome(tt, work, tx, ty)] += 1
    rows.append(_tally("Random edit of one zarr.json field (chunked and sharded stores): every "
                       "read path", res, "refused or read back exactly"))
    warnings.resetwarnings()
    return rows


def _tamper_matrix(tt: Any) -> sp.csr_matrix:
    X = sp.random(tt.N_ROWS, tt.N_COLS, density=0.1, format="csr", dtype=np.float32,
                  random_state=7)
    X.data += 1
    return X


def _tamper_outcome(tt: Any, path: Path, X: sp.csr_matrix, y: np.ndarray) -> str:
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
    with tempfile.TemporaryDirectory(prefix="reliability-") as d:
        tmp = Path(d)
        (tmp / "kills").mkdir()
        (tmp / "flips").mkdir()
        (tmp / "hostile").mkdir()
        (tmp / "damage").mkdir()
        (tmp / "env").mkdir()
        (tmp / "second").mkdir()
        rows = run_kills(tmp / "kills", kills, rng)
        rows += run_flips(tmp / "flips", flips, rng)
        rows += run_damage(tmp / "damage", flips, rng)
        rows += run_environment(tmp / "env", max(6, flips // 2), rng)
        rows += run_hostile(tmp / "hostile", fuzz, rng)
        rows += run_second_pass(tmp / "second", max(8, flips // 2), rng)
    lines = [
        "| Category | Faults / inputs tried | Outcome |",
        "|---|---:|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
        f"_{'--quick' if args.quick else 'full'} run, {time.monotonic() - t0:.0f} s; "
        "`python -m benchmarks reliability" + (" --quick" if args.quick else "") + "`_",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "reliability.md").write_text(text)
    print(text)
    failed = any("**" in c for _, _, c in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
