"""Run the benchmark suite: ``python -m benchmarks suite [--quick|--tiny] [--out DIR]``.

The setup writes one reference matrix (200k x 30k, ~100 nnz/row, float32 for the
default size) in every form the cases read -- a sparsestore store, an uncompressed .npz
for in-memory baselines, compressed .npz row shards, anndata's zarr and HDF5 encodings --
plus the scaling stores (x1, x4, x16 rows).  Then every case runs, by default each in a
fresh subprocess so its peak RSS is its own; ratios are computed between cases of this one
run.  Writes ``results.json`` (:mod:`benchmarks.records`' schema: one record per case),
``results.md`` generated from it, ``throughput.png`` and ``scaling.png`` to ``--out``
(default ``benchmarks/out``; ``--out benchmarks/results`` replaces the committed ones).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .bench_convert import make_shards
from .common import (
    CASES,
    SIZES,
    Ctx,
    add_out_argument,
    child,
    dump_json,
    load_avg,
    machine_info,
    make_matrix,
    matrix_blocks,
    rmtree,
    run_case,
)


def _load_cases() -> None:
    """Import every benchmark module so their cases register (in a stable order)."""
    from . import (  # noqa: F401
        baselines,
        bench_convert,
        bench_dask,
        bench_loader,
        bench_store,
    )


# ------------------------------------------------------------------ setup


def setup(ctx: Ctx, log: Any = print) -> None:
    """Write the reference matrix in every form the cases need (untimed)."""
    import numpy as np
    import scipy.sparse as sp

    import sparsestore

    s, work = ctx.size, Path(ctx.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    X = make_matrix(s.n_rows, s.n_cols, s.nnz_per_row)
    ctx.meta["nnz"] = int(X.nnz)
    ctx.meta["matrix_bytes"] = int(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes)
    log(f"setup: {s.n_rows:,} x {s.n_cols:,}, {X.nnz:,} nnz generated")

    ctx.paths["matrix_npz"] = str(work / "matrix_uncompressed.npz")
    sp.save_npz(ctx.paths["matrix_npz"], X, compressed=False)

    ctx.paths["store"] = str(work / "store.zarr")
    sparsestore.write_blocks(ctx.paths["store"], matrix_blocks(s.n_rows, s.n_cols,
                             s.nnz_per_row), n_cols=s.n_cols, dtype=np.float32, overwrite=True)

    ctx.paths["shards"] = str(work / "shards")
    ctx.meta["shard_max_bytes"] = make_shards(work / "shards", s.n_rows, s.n_cols,
                                              s.nnz_per_row, s.n_shards, X=X)["shard_max_bytes"]

    try:
        import anndata as ad
        import h5py
        import zarr

        ctx.paths["anndata_zarr"] = str(work / "anndata.zarr")
        rmtree(ctx.paths["anndata_zarr"])
        ad.io.write_elem(zarr.open_group(ctx.paths["anndata_zarr"], mode="w"), "X", X)
        ctx.paths["anndata_h5"] = str(work / "anndata.h5")
        with h5py.File(ctx.paths["anndata_h5"], "w") as f:
            ad.io.write_elem(f, "X", X)
    except ImportError as exc:
        log(f"setup: anndata baselines will skip ({exc})")
    del X

    for m in s.scaling:
        rows = s.scaling_base * m
        if rows == s.n_rows:
            ctx.paths[f"scaling_x{m}"] = ctx.paths["store"]  # same seed: the same matrix
            continue
        p = work / f"scaling_x{m}.zarr"
        sparsestore.write_blocks(p, matrix_blocks(rows, s.n_cols, s.nnz_per_row),
                                 n_cols=s.n_cols, dtype=np.float32, overwrite=True)
        ctx.paths[f"scaling_x{m}"] = str(p)
    log(f"setup: done in {time.perf_counter() - t0:.0f} s")


# ------------------------------------------------------------------ running


def run_isolated(name: str, ctx_file: Path, timeout: float) -> dict[str, Any]:
    """Run one case in a fresh interpreter; its result comes back as JSON."""
    try:
        return child("run", "--child", name, "--ctx", ctx_file, timeout=timeout)
    except subprocess.TimeoutExpired:
        reason = f"timed out after {timeout:.0f} s"
    except RuntimeError as exc:  # its exit status, or the end of its stderr
        reason = " / ".join(str(exc).strip().splitlines()[-3:])
    return CASES[name].record(status="error", reason=reason)


def select(patterns: str | None) -> list[str]:
    names = list(CASES)
    if not patterns:
        return names
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="size", const="quick",
                      help="50k rows; a few minutes on 2 cores")
    size.add_argument("--tiny", action="store_const", dest="size", const="tiny",
                      help="3k rows, in-process: proves the suite runs (CI)")
    add_out_argument(ap)
    ap.add_argument("--work", type=Path, default=None,
                    help="scratch directory for the data (default: a temp dir, removed)")
    ap.add_argument("--cases", default=None,
                    help="comma-separated case names or globs (default: all)")
    iso = ap.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="each case in a fresh subprocess (default except --tiny)")
    iso.add_argument("--no-isolate", dest="isolate", action="store_false",
                     help="all cases in this process (fast; RSS figures approximate)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ctx", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.size = args.size or "full"
    if args.isolate is None:
        args.isolate = args.size != "tiny"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the suite (or one case with ``--child``); returns the run's record."""
    args = parse_args(argv)
    _load_cases()
    if args.child:
        ctx = Ctx.from_json(json.loads(args.ctx.read_text()))
        res = run_case(args.child, ctx)
        print(dump_json(res, indent=None))
        return res
    if args.list:
        for n in select(args.cases):
            print(f"{n:24s} {CASES[n].description}")
        return {}

    names = select(args.cases)
    size = SIZES[args.size]
    tmp = None if args.work else tempfile.mkdtemp(prefix="sparsestore-bench-")
    work = Path(args.work or tmp)
    ctx = Ctx(work=str(work), size=size)
    machine = machine_info()
    t_start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    try:
        setup(ctx)
        ctx_file = work / "ctx.json"
        dump_json(ctx.to_json(), ctx_file)
        timeout = {"tiny": 300, "quick": 600, "full": 1800}[size.name]
        for name in names:
            t0 = time.perf_counter()
            r = run_isolated(name, ctx_file, timeout) if args.isolate else run_case(name, ctx)
            results[name] = r
            print(f"{name:24s} {_summary(r)}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    finally:
        if tmp is not None:
            rmtree(tmp)
    run = {
        "command": "python -m benchmarks suite " + " ".join(argv if argv is not None
                                                             else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wall_s": time.perf_counter() - t_start,
        "size": {**size.__dict__, "scaling": list(size.scaling)},
        "batch_size": ctx.batch_size,
        "meta": ctx.meta,
        "isolated": bool(args.isolate),
        "machine": machine,
        "load_avg_end": load_avg(),
        "results": results,
        "notes": [],
    }
    load = max(machine["load_avg"][0], run["load_avg_end"][0])
    if load > 0.75 * machine["cores"]:
        run["noisy"] = (f"1-minute load average reached {load:.1f} on {machine['cores']} cores "
                        "(other processes were running): timings are noisy, ratios within "
                        "this run are more trustworthy than absolute numbers.")
    write_outputs(run, Path(args.out))
    return run


def write_outputs(run: dict[str, Any], out: Path) -> None:
    """``results.json`` (a record per case), ``results.md`` from it, and the two charts."""
    from . import report
    from .records import write_records

    meta = {k: v for k, v in run.items() if k != "results"}
    meta["commit"] = run["machine"]["commit"]
    doc = write_records("results", run["results"].values(), meta, out,
                        lambda d: report.markdown(d, out), echo=False)
    run = report.as_run(doc)
    report.throughput_png(run, out / "throughput.png")
    report.scaling_png(run, out / "scaling.png")
    print(f"results: {out / 'results.md'}")


def _summary(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('reason', '')}"
    return (f"{r['nnz'] / r['seconds'] / 1e6:8.2f} M nnz/s {r['rows'] / r['seconds']:10.0f} "
            f"rows/s  RSS +{r['rss_growth_mib']:.0f} MiB (peak "
            f"{r['rss_start_mib'] + r['rss_growth_mib']:.0f})")


if __name__ == "__main__":
    main()
    sys.exit(0)
