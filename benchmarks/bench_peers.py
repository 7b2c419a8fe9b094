"""sparsestore beside the loaders single-cell users pick instead, on one single-cell-shaped store.

One matrix, written three ways: a sparsestore store, an anndata ``.h5ad`` (CSR, read backed)
and annbatch collections made from that ``.h5ad``.  The matrix is
:func:`benchmarks.bench_shuffle.zipf_blocks` (``--rows`` x 20,000, ~800 nnz/row, Zipf column
popularity, integer counts as float32) with :func:`benchmarks.bench_shuffle.group_labels`'
30 uneven label groups stored one after another.  Configs, batch size 1024:

* sparsestore: sequential; the default ``shuffle=True``; ``sampler=`` a random permutation;
  ``store[rows]`` with sorted random 1024-row batches (both random-access configs timed on
  their first ``--random-rows`` rows only);
* anndata: the backed ``.h5ad``, ``adata.X[rows]`` with sorted random 1024-row batches
  (timed on the same rows);
* annbatch (its authors' route): ``DatasetCollection.add_adatas(shuffle=True)`` makes the
  pre-shuffled copy (time and peak RSS reported), ``Loader(shuffle=True)`` reads it with its
  default chunks (512 rows x 32); and without the pre-shuffle, the same loader on an
  ``add_adatas(shuffle=False)`` copy (storage order kept), with its default chunks and with
  the small chunks its docs advise for unshuffled data (32 rows x 256); the zarrs codec
  pipeline on, as its docs require on a local disk;
* scDataset: ``BlockShuffling()`` defaults (block 8, ``fetch_factor`` 16) over the backed
  ``.h5ad``.

annbatch needs Python >= 3.12, so the peers run in another interpreter (``--peer-python``,
default ``/work/peers-venv/bin/python``: ``pip install "annbatch[zarrs]" anndata scdataset
psutil``).  Every pass runs in a fresh subprocess after a one-batch warm-up, the configs
interleaved, median of ``--repeats``; peak RSS is sampled (psutil) during loader set-up and
pass.  Batch label quality comes from the row ids each loader actually yielded
(:func:`sparsestore.mixing.batch_mixing` against the whole store's label mix), beside a true
permutation's; a whole pass also checks that every row came exactly once.  Run::

    python -m benchmarks peers [--rows 200000] [--repeats 3] [--out DIR]

writes ``peers.json`` and ``peers.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .common import MiB, RssSampler, _version, add_out_argument, child, dir_bytes, load_avg

BATCH = 1024
N_COLS = 20_000
NNZ_PER_ROW = 800
GROUPS = 30
LABEL = "group"
SHUFFLE_SEED = 0  # the default shuffle's seed, as a user would write it
PERM_SEED = 20_240_607  # the random permutation every random-access config reads
PEER_PYTHON = "/work/peers-venv/bin/python"
ROOT = Path(__file__).resolve().parent.parent

# name -> (side, label in the table, whole pass?)
CONFIGS: dict[str, tuple[str, str, bool]] = {
    "ss_sequential": ("sparsestore", "sparsestore sequential", True),
    "ss_shuffle": ("sparsestore", "sparsestore default shuffle (`shuffle=True, seed=0`)", True),
    "ss_sampler": ("sparsestore", "sparsestore `sampler=` a random permutation", False),
    "ss_take": ("sparsestore", "sparsestore `store[rows]`, sorted random 1024-row batches",
                False),
    "ss_shuffle_shards": ("sparsestore", "sparsestore default shuffle, store rewritten with "
                          "128 KiB chunks in 8 MiB shards", True),
    "ss_take_shards": ("sparsestore", "sparsestore `store[rows]`, 128 KiB chunks in 8 MiB "
                       "shards", False),
    "h5ad_random": ("peer", "anndata backed `.h5ad`, `X[rows]`, sorted random 1024-row "
                    "batches", False),
    "annbatch_preshuffled": ("peer", "annbatch on its pre-shuffled copy (`Loader(shuffle=True)`"
                             ", chunks 512 x 32)", True),
    "annbatch_chunks": ("peer", "annbatch shuffled chunks, no pre-shuffle (chunks 512 x 32)",
                        True),
    "annbatch_chunks_small": ("peer", "annbatch shuffled chunks, no pre-shuffle (chunks 32 x "
                              "256)", True),
    "scdataset": ("peer", "scDataset `BlockShuffling()` defaults on the backed `.h5ad`", True),
}


def _perm(n_rows: int) -> np.ndarray:
    return np.random.default_rng(PERM_SEED).permutation(n_rows)


def _take(X: Any, labels: Any, n_rows: int, limit: int) -> Iterator[tuple[np.ndarray, int]]:
    """``X[rows]`` and ``labels[rows]`` for sorted 1024-row batches of the first ``limit``
    rows of the random permutation: ``(rows, nnz)`` per batch."""
    perm = _perm(n_rows)[:limit]
    for i in range(0, perm.size, BATCH):
        rows = np.sort(perm[i:i + BATCH])
        nnz = X[rows].nnz
        labels[rows]
        yield rows, nnz


# ------------------------------------------------------------------ one timed pass

def _timed(make: Callable[[], Any], batches: Callable[[Any], Iterator[tuple[np.ndarray, int]]],
           warm: Callable[[], None]) -> dict[str, Any]:
    """``warm()`` (untimed, unsampled), then ``make()`` and one pass of ``batches(made)``
    (``(row ids, nnz)`` per batch) timed, with peak RSS sampled across both."""
    warm()
    gc.collect()
    with RssSampler() as rss:
        obj = make()
        rows: list[np.ndarray] = []
        nnz = 0
        t0 = time.perf_counter()
        for r, z in batches(obj):
            rows.append(np.asarray(r, dtype=np.int64))
            nnz += z
        dt = max(time.perf_counter() - t0, 1e-9)
    n = sum(r.size for r in rows)
    return {"rows": n, "nnz": nnz, "seconds": dt, "rows_per_s": n / dt,
            "mnnz_per_s": nnz / dt / 1e6, "peak_rss_mib": rss.peak / MiB,
            "rss_growth_mib": rss.growth / MiB, "batch_rows": rows}


def _child_sparsestore(name: str, work: Path, random_rows: int) -> dict[str, Any]:
    import sparsestore

    path = work / ("store_shards.zarr" if name.endswith("_shards") else "store.zarr")

    def warm() -> None:  # a process's first pass pays lazy imports and first calls
        it = sparsestore.DataLoader(str(path), BATCH, labels=LABEL).iter_batches()
        next(it, None)
        it.close()

    def loader_batches(loader: Any) -> Iterator[tuple[np.ndarray, int]]:
        it = loader.iter_batches()
        try:
            for b in it:
                yield b.rows, b.nnz
        finally:
            it.close()

    if name in ("ss_take", "ss_take_shards"):
        return _timed(lambda: sparsestore.open(str(path)), lambda s: _take(
            s, s.labels[LABEL], s.n_rows, random_rows), warm)

    def make_loader() -> Any:
        store = sparsestore.open(str(path))
        if name == "ss_sequential":
            return sparsestore.DataLoader(store, BATCH, shuffle=False, labels=LABEL)
        if name in ("ss_shuffle", "ss_shuffle_shards"):
            return sparsestore.DataLoader(store, BATCH, shuffle=True, seed=SHUFFLE_SEED,
                                          labels=LABEL)
        order = _perm(store.n_rows)[:random_rows]
        return sparsestore.DataLoader(store, BATCH, sampler=order.tolist(), labels=LABEL)
    return _timed(make_loader, loader_batches, warm)


def _zarrs() -> None:
    """annbatch's docs: the zarrs codec pipeline is required for speed on a local disk."""
    import zarr

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})


def _annbatch_loader(collection: Path, shuffle_seed: int, chunk_size: int,
                     preload_nchunks: int) -> Any:
    import anndata as ad
    import zarr
    from annbatch import DatasetCollection, Loader

    def load(g: zarr.Group) -> Any:  # X and the two obs columns only (annbatch's README)
        return ad.AnnData(X=ad.io.sparse_dataset(g["X"]),
                          obs=ad.io.read_elem(g["obs"])[[LABEL, "row"]])

    loader = Loader(batch_size=BATCH, chunk_size=chunk_size, preload_nchunks=preload_nchunks,
                    shuffle=True, rng=np.random.default_rng(shuffle_seed),
                    preload_to_gpu=False)
    with ad.settings.override(remove_unused_categories=False):
        return loader.use_collection(DatasetCollection(str(collection), mode="r"),
                                     load_adata=load)


ANNBATCH = {"annbatch_preshuffled": ("annbatch_shuffled.zarr", 512, 32),
            "annbatch_chunks": ("annbatch_unshuffled.zarr", 512, 32),
            "annbatch_chunks_small": ("annbatch_unshuffled.zarr", 32, 256)}


def _child_peer(name: str, work: Path, random_rows: int) -> dict[str, Any]:
    import anndata as ad

    h5ad = work / "matrix.h5ad"
    if name == "h5ad_random":
        def warm() -> None:
            a = ad.read_h5ad(h5ad, backed="r")
            a.X[np.arange(0, a.n_obs, max(1, a.n_obs // BATCH))[:BATCH]]
            a.file.close()

        return _timed(lambda: ad.read_h5ad(h5ad, backed="r"), lambda a: _take(
            a.X, a.obs[LABEL].to_numpy(), a.n_obs, random_rows), warm)

    if name in ANNBATCH:
        _zarrs()
        folder, chunk, preload = ANNBATCH[name]

        def warm() -> None:
            it = iter(_annbatch_loader(work / folder, 1, chunk, preload))
            next(it)
            it.close()

        def batches(loader: Any) -> Iterator[tuple[np.ndarray, int]]:
            for b in loader:
                yield b["obs"]["row"].to_numpy(), b["X"].nnz
        return _timed(lambda: _annbatch_loader(work / folder, SHUFFLE_SEED, chunk, preload),
                      batches, warm)

    if name == "scdataset":
        from scdataset import BlockShuffling, scDataset

        def fetch(a: Any, idx: np.ndarray) -> tuple[Any, np.ndarray]:
            return a.X[idx], idx

        def pick(data: tuple[Any, np.ndarray], sel: np.ndarray) -> tuple[Any, np.ndarray]:
            return data[0][sel], data[1][sel]

        def make(seed: int = SHUFFLE_SEED) -> Any:
            return scDataset(ad.read_h5ad(h5ad, backed="r"), BlockShuffling(), batch_size=BATCH,
                             fetch_callback=fetch, batch_callback=pick, seed=seed)

        def warm() -> None:
            next(iter(make(1)))

        def batches(ds: Any) -> Iterator[tuple[np.ndarray, int]]:
            for X, rows in ds:
                yield rows, X.nnz
        return _timed(make, batches, warm)
    raise ValueError(f"unknown peer config {name!r}")


def _child_prepare(kind: str, work: Path) -> dict[str, Any]:
    """annbatch's preparation of a collection from the ``.h5ad``: time and peak RSS."""
    _zarrs()
    from annbatch import DatasetCollection

    out = work / f"annbatch_{kind}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    with RssSampler() as rss:
        t0 = time.perf_counter()
        DatasetCollection(str(out)).add_adatas([str(work / "matrix.h5ad")],
                                               shuffle=kind == "shuffled",
                                               rng=np.random.default_rng(PERM_SEED))
        dt = time.perf_counter() - t0
    return {"seconds": dt, "peak_rss_mib": rss.peak / MiB, "rss_growth_mib": rss.growth / MiB,
            "disk_mib": dir_bytes(out) / MiB}


def _peer_versions() -> dict[str, Any]:
    return {"python": platform.python_version(), **{p: _version(p) for p in (
        "annbatch", "anndata", "scDataset", "zarr", "zarrs", "numpy", "scipy", "h5py", "torch")}}


def child_main(args: argparse.Namespace) -> None:
    """The subprocess side: one pass (or one preparation), its result printed as JSON and
    the row ids it yielded saved beside the stores."""
    work = Path(args.work)
    if args.child == "versions":
        res: dict[str, Any] = _peer_versions()
    elif args.child.startswith("prepare_"):
        res = _child_prepare(args.child.removeprefix("prepare_"), work)
    else:
        side = CONFIGS[args.child][0]
        fn = _child_sparsestore if side == "sparsestore" else _child_peer
        res = fn(args.child, work, args.random_rows)
        rows = res.pop("batch_rows")
        np.savez(work / f"{args.child}.npz",
                 rows=np.concatenate(rows) if rows else np.zeros(0, np.int64),
                 sizes=np.array([r.size for r in rows], dtype=np.int64))
    print(json.dumps(res))


# ------------------------------------------------------------------ the parent

def _run_child(python: str, name: str, work: Path, random_rows: int, timeout: float
               ) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None]:
    """One child run of ``name`` in ``python``: its result, and the row ids it yielded with
    its batch sizes (None for a child that yields no rows)."""
    npz = work / f"{name}.npz"
    npz.unlink(missing_ok=True)
    try:
        res = child("bench_peers", "--child", name, "--work", work, "--random-rows",
                    random_rows, timeout=timeout, python=python,
                    env={"PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"})
    except RuntimeError as exc:  # the end of its stderr, for the page
        raise RuntimeError(f"{name}: " + " / ".join(str(exc).strip().splitlines()[-6:])) from None
    if not npz.exists():
        return res, None, None
    with np.load(npz) as z:
        return res, z["rows"], z["sizes"]


def _mixing(rows: np.ndarray, sizes: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Batch label quality of what a loader yielded, against the whole store's label mix."""
    from sparsestore.mixing import batch_mixing

    ends = np.cumsum(sizes)
    m = batch_mixing(np.split(rows, ends[:-1]), labels, against_all_labels=True)
    return {"tv": m.tv, "distinct": m.distinct, "batches": m.batches}


def _write_inputs(work: Path, n_rows: int, log: Callable[[str], None]) -> dict[str, Any]:
    """The sparsestore store and the same matrix as a ``.h5ad`` (untimed set-up, except for
    the write times reported)."""
    import anndata as ad
    import pandas as pd

    import sparsestore

    from .bench_shuffle import StoreSpec, write_store

    spec = StoreSpec("singlecell", n_rows, N_COLS, NNZ_PER_ROW, GROUPS, True)
    facts = write_store(spec, work / "store.zarr")
    store = sparsestore.open(work / "store.zarr")
    log(f"store: {facts['rows']:,} x {facts['cols']:,}, {facts['nnz_per_row']:.0f} nnz/row, "
        f"written in {facts['write_s']:.1f} s")
    t0 = time.perf_counter()
    sparsestore.convert(work / "store.zarr", work / "store_shards.zarr", progress=False,
                        chunk_bytes=128 * 2**10, shard_bytes=8 * 2**20)
    log(f"store rewritten with 128 KiB chunks in 8 MiB shards in "
        f"{time.perf_counter() - t0:.1f} s")
    X = store[:]
    y = np.asarray(store.labels[LABEL][:])
    obs = pd.DataFrame({LABEL: y, "row": np.arange(n_rows, dtype=np.int64)},
                       index=pd.Index([str(i) for i in range(n_rows)]))
    var = pd.DataFrame(index=pd.Index([f"g{j}" for j in range(N_COLS)]))
    t0 = time.perf_counter()
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(work / "matrix.h5ad")
    h5_s = time.perf_counter() - t0
    del X
    gc.collect()
    log(f"h5ad written in {h5_s:.1f} s")
    return {"facts": facts, "labels": y, "h5ad_s": h5_s,
            "store_mib": dir_bytes(work / "store.zarr") / MiB,
            "h5ad_mib": dir_bytes(work / "matrix.h5ad") / MiB,
            "chunks": store.info()["chunks"]}


def run(args: argparse.Namespace, work: Path, log: Callable[[str], None] = print
        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    inputs = _write_inputs(work, args.rows, log)
    labels = inputs["labels"]
    n = args.rows
    peer = args.peer_python
    facts: dict[str, Any] = {"load_avg_start": load_avg()}
    names = [c for c in args.configs.split(",") if c]
    if Path(peer).exists():
        facts["peer_versions"], _, _ = _run_child(peer, "versions", work, args.random_rows,
                                                  300)
    else:  # the sparsestore side still runs; the page says why the peers are missing
        log(f"no peer interpreter at {peer}: the peer configs are skipped")
        facts["peer_versions"] = {"python": f"missing ({peer})"}
        names = [c for c in names if CONFIGS[c][0] == "sparsestore"]

    prep: list[dict[str, Any]] = [
        {"group": "preparation", "step": "sparsestore store (`write_blocks`, as generated)",
         "seconds": inputs["facts"]["write_s"], "peak RSS MiB": None,
         "disk MiB": inputs["store_mib"], "note": "the store the sparsestore configs read"},
        {"group": "preparation", "step": "anndata `.h5ad` (`write_h5ad`, from memory)",
         "seconds": inputs["h5ad_s"], "peak RSS MiB": None, "disk MiB": inputs["h5ad_mib"],
         "note": "uncompressed CSR; the input of annbatch and scDataset"}]
    steps = (("shuffled", "annbatch pre-shuffled copy (`add_adatas(shuffle=True)`)"),
             ("unshuffled", "annbatch copy in storage order (`add_adatas(shuffle=False)`)"))
    for kind, what in steps if Path(peer).exists() else ():
        try:
            r, _, _ = _run_child(peer, f"prepare_{kind}", work, args.random_rows,
                                 args.timeout)
            prep.append({"group": "preparation", "step": what, "seconds": r["seconds"],
                         "peak RSS MiB": r["peak_rss_mib"], "disk MiB": r["disk_mib"],
                         "note": "from the `.h5ad`, zarrs pipeline; peak RSS sampled, "
                                 "imports included"})
        except Exception as exc:  # noqa: BLE001 -- reported in the page
            prep.append({"group": "preparation", "step": what, "note": f"failed: {exc}"[:400]})
        log(f"prepare {kind}: {prep[-1]}")

    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in names}
    mix: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for rep in range(args.repeats):  # interleaved: a slow spell of the box hits every config
        for c in names:
            if c in errors:
                continue
            python = sys.executable if CONFIGS[c][0] == "sparsestore" else peer
            try:
                r, rows, sizes = _run_child(python, c, work, args.random_rows, args.timeout)
            except Exception as exc:  # noqa: BLE001 -- a peer that fails is reported
                errors[c] = str(exc)[:400]
                log(f"  {c}: FAILED {errors[c]}")
                continue
            runs[c].append(r)
            if c not in mix:
                m = _mixing(rows, sizes, labels)
                whole = np.sort(rows)
                m["every_row_once"] = bool(whole.size == n and np.array_equal(
                    whole, np.arange(n))) if CONFIGS[c][2] else None
                mix[c] = m
            log(f"  round {rep + 1} {c}: {r['rows_per_s']:,.0f} rows/s, TV {mix[c]['tv']:.3f}, "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB")
    facts["load_avg_end"] = load_avg()

    # a true permutation of all rows, cut into the same batches (the best a shuffle can do)
    from sparsestore.mixing import batch_mixing

    perm = _perm(n)
    pm = batch_mixing([perm[i:i + BATCH] for i in range(0, n, BATCH)], labels,
                      against_all_labels=True)
    seq = batch_mixing([np.arange(i, min(i + BATCH, n)) for i in range(0, n, BATCH)], labels,
                       against_all_labels=True)
    facts.update(tv_permutation=pm.tv, distinct_permutation=pm.distinct, tv_sequential=seq.tv)

    records: list[dict[str, Any]] = []
    for c in names:
        side, label, whole = CONFIGS[c]
        if c in errors:
            records.append({"group": "loaders", "config": label, "note": f"failed: {errors[c]}"})
            continue
        rs = runs[c]
        rps = [r["rows_per_s"] for r in rs]
        records.append({
            "group": "loaders", "config": label,
            "rows/s": statistics.median(rps),
            "rows/s min-max": [min(rps), max(rps)],
            "M nnz/s": statistics.median(r["mnnz_per_s"] for r in rs),
            "TV": mix[c]["tv"], "TV x perm": mix[c]["tv"] / pm.tv,
            "labels/batch": mix[c]["distinct"],
            "rows timed": rs[0]["rows"],
            "every row once": mix[c]["every_row_once"],
            "peak RSS MiB": statistics.median(r["peak_rss_mib"] for r in rs),
            "RSS growth MiB": statistics.median(r["rss_growth_mib"] for r in rs),
            "runs": len(rs),
            "name": c,
        })
    records.append({"group": "loaders", "config": "a true permutation (index math, all rows)",
                    "TV": pm.tv, "TV x perm": 1.0, "labels/batch": pm.distinct,
                    "name": "permutation"})
    return prep + records + verdicts(records, prep), facts


def verdicts(records: list[dict[str, Any]], prep: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The two targets against the peers (shuffle against annbatch's pre-shuffled copy,
    random access against the backed ``.h5ad``), read from this run's records."""
    by = {r.get("name"): r for r in records if "rows/s" in r}
    out: list[dict[str, Any]] = []
    ss, ab = by.get("ss_shuffle"), by.get("annbatch_preshuffled")
    if ss and ab:
        fast = ss["rows/s"] >= ab["rows/s"]
        mixed = ss["TV"] <= 1.05 * ab["TV"]
        out.append({"group": "targets",
                    "target": "default shuffle rows/s >= annbatch's on its pre-shuffled copy, "
                              "batch TV as good (<= 1.05x annbatch's), no pre-shuffled copy",
                    "sparsestore": f"{ss['rows/s']:,.0f} rows/s, TV {ss['TV']:.3f}",
                    "peer": f"{ab['rows/s']:,.0f} rows/s, TV {ab['TV']:.3f} (after a "
                            + next((f"{p['seconds']:.1f} s preparation" for p in prep
                                    if "pre-shuffled" in p["step"] and "seconds" in p),
                                   "preparation") + ")",
                    "ratio": f"{ss['rows/s'] / ab['rows/s']:.2f}x rows/s, "
                             f"{ss['TV'] / ab['TV']:.2f}x TV",
                    "verdict": "met" if fast and mixed else "NOT met" + (
                        "" if mixed else " (TV)") + ("" if fast else " (rows/s)")})
    rnd = [by[k] for k in ("ss_sampler", "ss_take") if k in by]
    h5 = by.get("h5ad_random")
    if rnd and h5:
        best = max(rnd, key=lambda r: r["rows/s"])
        out.append({"group": "targets",
                    "target": "random access (`sampler=` or `store[rows]`) >= anndata backed "
                              "`.h5ad` with a sorted random index, in bounded memory",
                    "sparsestore": "; ".join(f"{r['config'].split(' ', 1)[1]}: "
                                             f"{r['rows/s']:,.0f} rows/s, peak RSS "
                                             f"{r['peak RSS MiB']:.0f} MiB" for r in rnd),
                    "peer": f"{h5['rows/s']:,.0f} rows/s, peak RSS {h5['peak RSS MiB']:.0f} MiB",
                    "ratio": f"{best['rows/s'] / h5['rows/s']:.2f}x (best)",
                    "verdict": "met" if best["rows/s"] >= h5["rows/s"] else "NOT met"})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks peers",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="store rows (default 200000)")
    p.add_argument("--repeats", type=int, default=3, help="passes per config (median)")
    p.add_argument("--random-rows", "--random_rows", type=int, default=20_480,
                   help="rows the random-access configs are timed on (default 20480)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="configs to run, in order")
    p.add_argument("--peer-python", "--peer_python", default=PEER_PYTHON,
                   help="Python >= 3.12 with annbatch[zarrs], anndata, scdataset, psutil")
    p.add_argument("--work", default=None, help="folder for the stores (default: a temporary "
                   "one, removed afterwards)")
    p.add_argument("--timeout", type=float, default=900, help="seconds one subprocess may run")
    p.add_argument("--note", default="", help="a sentence added to the page (not recorded in "
                   "the command)")
    add_out_argument(p)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(args)
        return {}

    from .common import reproduce_command
    from .records import run_meta, write_records

    command = reproduce_command("benchmarks peers", p, args, ("rows", "repeats",
                                                              "random_rows", "configs"))
    tmp = None if args.work else tempfile.mkdtemp(prefix="ssbench-peers-")
    work = Path(args.work or tmp)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        records, facts = run(args, work)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    facts["wall_s"] = time.perf_counter() - t0
    meta = run_meta(command, title="sparsestore beside annbatch, scDataset and anndata on a "
                    "single-cell-shaped store", rows=args.rows, repeats=args.repeats,
                    random_rows=args.random_rows, batch_size=BATCH, **facts)
    meta["note"] = page_note(meta, args.note)
    return write_records("peers", records, meta, args.out)


def page_note(meta: dict[str, Any], extra: str = "") -> str:
    """What the tables mean and how they were made (kept in the json, so the page is
    generated from it alone)."""
    m, pv = meta["machine"], meta["peer_versions"]
    ss_v = m["versions"]
    return "\n".join([
        f"Store: {meta['rows']:,} rows x {N_COLS:,} columns, ~{NNZ_PER_ROW} nnz/row (Zipf "
        f"column popularity, lognormal row sizes, integer counts as float32), {GROUPS} label "
        "groups of uneven sizes stored one after another (`benchmarks.bench_shuffle."
        "zipf_blocks` / `group_labels`).  Batch size "
        f"{meta['batch_size']}.  Machine: {m['cpu']}, {m['cores']} usable cores (shared with "
        f"other work), {m['ram_gib']} GiB RAM, {m['os']}; load average "
        f"{', '.join(map(str, meta['load_avg_start']))} at the start, "
        f"{', '.join(map(str, meta['load_avg_end']))} at the end; wall time "
        f"{meta['wall_s']:.0f} s.",
        "",
        f"sparsestore side: Python {m['python']}, sparsestore {ss_v.get('sparsestore')}, "
        f"zarr {ss_v.get('zarr')}, numpy {ss_v.get('numpy')}.  Peer side (its own venv, "
        f"Python {pv['python']}): " + ", ".join(f"{k} {pv[k]}" for k in pv if k != "python")
        + ".",
        "",
        f"Every pass ran in a fresh subprocess after a one-batch warm-up; configs interleaved, "
        f"rows/s the median of {meta['repeats']} runs (min-max beside it).  Files were just "
        "written, so reads come from the page cache: these are CPU costs, not disk speed.  "
        "Random-access configs (`sampler=`, `store[rows]`, the `.h5ad`) read the same random "
        f"permutation and are timed on its first {meta['random_rows']:,} rows only.  TV: mean "
        "total-variation distance between each yielded batch's label histogram and the whole "
        "store's, from the row ids each loader yielded (`sparsestore.mixing.batch_mixing`); "
        "`TV x perm` divides by a true permutation's; `every row once`: a whole pass served "
        "each row exactly once.  Peak RSS: the subprocess's, sampled every 5 ms from loader "
        "set-up to the end of the pass (imports included); growth: above the RSS after "
        "imports and warm-up.  annbatch ran with the zarrs codec pipeline (its docs: required "
        "on a local disk), no GPU (`preload_to_gpu=False`), obs cut to the label and row id "
        "as its README advises.",
        *([] if not extra else ["", extra]),
    ])


if __name__ == "__main__":
    main(sys.argv[1:])
