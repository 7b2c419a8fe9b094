"""The ``sparsestore`` command: convert, info, validate, bench, shuffle-check.

A path may be an fsspec URL (``s3://bucket/x.zarr``): ``--storage-options`` passes fsspec's
options for it (JSON, or ``@FILE`` holding JSON); without them s3fs reads credentials from
the environment.

Every failure the library reports on purpose (a :class:`~sparsestore.errors.SparseStoreError`,
raised where bad input is read) and every OS error ends as one line,
``sparsestore: error: ...``, on stderr with a non-zero exit status.  Anything else is a
bug, and shows its traceback.
Progress bars go to stderr and only on a terminal (``--quiet`` turns them off).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InvalidInputError, SparseStoreError, StoreExistsError
from .oserrors import translate
from .progress import make_bar

PROG = "sparsestore"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"4MiB"``, ``"4M"``, ``"512k"`` or ``"1048576"`` as bytes (binary multiples)."""
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4MiB, 512KiB, 1048576)")
    value, unit = float(m.group(1)), m.group(2).lower()
    return int(value * 1024 ** " kmgt".index(unit or " "))


def parse_storage_options(text: str) -> dict[str, Any]:
    """``--storage-options``: a JSON object, or ``@FILE`` holding one (keeps secrets out of
    the command line), as fsspec's options for ``s3://``... URLs."""
    raw = str(text)
    if raw.startswith("@"):
        try:
            with open(raw[1:]) as fh:
                raw = fh.read()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]!r}: {exc}") from None
    try:
        opts = json.loads(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(opts, dict):
        raise argparse.ArgumentTypeError(
            'must be a JSON object, e.g. {"endpoint_url": "http://127.0.0.1:9000"}')
    return opts


STORAGE_HELP = ("fsspec options for s3:// (and other) URLs, as a JSON object or @FILE.json: "
                'e.g. {"endpoint_url": "...", "key": "...", "secret": "..."}; without '
                "them s3fs takes credentials as boto3 does (AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ~/.aws, an instance role)")


def _add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-options", type=parse_storage_options, metavar="JSON",
                        help=STORAGE_HELP)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


# ------------------------------------------------------------------ argument parsing

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Huge sparse matrices on disk (Zarr v3, anndata CSR), streamed into training.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser("convert", help="convert files (npz, npy, mtx, svmlight, h5ad, zarr) "
                       "into a store",
                       description="Convert SRC file(s) into a new store at DST (atomic).")
    c.add_argument("paths", nargs="+", metavar="SRC... DST",
                   help="source file(s) or glob(s), then the destination store")
    c.add_argument("--from", dest="format", metavar="FORMAT",
                   help="source format: npz, npy, mtx, svmlight, h5ad, zarr (default: from "
                   "the file name)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    _add_storage_options(c)
    c.add_argument("--source-storage-options", type=parse_storage_options, metavar="JSON",
                   help="fsspec options for a SRC store URL when they differ from "
                   "--storage-options (which apply to SRC and DST alike)")
    c.add_argument("--workers", type=int, metavar="N",
                   help="npz shards decompressed in parallel (default: up to 4)")
    c.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    c.add_argument("--labels", action="append", metavar="NAMES",
                   help="obs columns (h5ad/anndata zarr), label arrays (npz) or labels to copy "
                   "(store); comma-separated, repeatable")
    c.add_argument("--key", help="npz: the member holding a dense matrix")
    c.add_argument("--dtype", help="value dtype of the new store (default: the source's)")
    c.add_argument("--casting", choices=["same_value", "safe", "unsafe"], default="same_value",
                   help="with --dtype: same_value (default) refuses a value the dtype cannot "
                   "hold; unsafe casts as numpy's astype does")
    c.add_argument("--dense", action="store_true", help="keep a dense source dense")
    c.add_argument("--n-features", type=int, metavar="N", help="svmlight: number of columns")
    c.add_argument("--zero-based", choices=("auto", "yes", "no"), default=None,
                   help="svmlight: whether indices start at 0 (default auto)")
    c.add_argument("--max-bytes", type=parse_size, metavar="SIZE",
                   help="npz, h5ad, anndata zarr: refuse a file (npz: a shard) declaring more "
                   "than SIZE of data (default 8GiB)")
    c.add_argument("--tmp-dir", metavar="DIR", help="where to spill (mtx, svmlight, CSC h5ad)")
    c.add_argument("--nan-policy", choices=("raise", "keep"), default="raise",
                   help="NaN and infinite values: refuse them (default) or store them")
    c.add_argument("--shuffle-rows", type=int, metavar="SEED",
                   help="write the rows in the random order "
                   "numpy.random.default_rng(SEED).permutation(n_rows), labels alike, the "
                   "permutation kept as a label, so a sequential loader mixes like a shuffle")
    c.add_argument("--source-row-label", metavar="NAME",
                   help="with --shuffle-rows: the label recording each row's source row "
                   "(default source_row)")
    c.add_argument("--memory-bytes", type=parse_size, metavar="SIZE",
                   help="memory budget for spilling sources (mtx, CSC h5ad) and for "
                   "--shuffle-rows blocks; a bigger one shuffles in fewer passes (default "
                   "256MiB)")
    g = c.add_argument_group("layout")
    g.add_argument("--compressor", choices=("lz4", "zstd", "blosclz", "zlib", "lz4hc", "none"))
    g.add_argument("--clevel", type=int, metavar="0-9")
    g.add_argument("--chunk-bytes", type=parse_size, metavar="SIZE",
                   help="uncompressed bytes per data chunk (default 4MiB)")
    g.add_argument("--shard-bytes", type=parse_size, metavar="SIZE",
                   help="bytes per zarr shard (turns sharding on)")
    g.add_argument("--no-checksum", action="store_true", help="no CRC32C per chunk")

    i = sub.add_parser("info", help="describe a store",
                       description="Shape, nnz, density, dtype, chunking, bytes and labels.")
    i.add_argument("path", metavar="PATH")
    i.add_argument("--json", action="store_true", help="print JSON")
    _add_storage_options(i)
    i.add_argument("--plot", metavar="FILE.png",
                   help="draw the nnz-per-row histogram and a density map (streamed)")
    i.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    v = sub.add_parser("validate", help="check a store's structure and every chunk",
                       description="Check metadata, structure and every chunk's CRC32C.")
    v.add_argument("path", metavar="PATH")
    v.add_argument("--quick", action="store_true", help="metadata and structure only")
    _add_storage_options(v)
    v.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    u = sub.add_parser("upgrade", help="add the chunk manifest to a store written before it",
                       description="Check every chunk of a store written by an older "
                       "sparsestore, then add the manifest that lets every read detect a "
                       "missing, moved or replaced chunk (needed before appending to it).")
    u.add_argument("path", metavar="PATH")
    u.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _add_storage_options(u)

    b = sub.add_parser("bench", help="stream one epoch through the DataLoader",
                       description="Stream one epoch through sparsestore.DataLoader; print "
                       "rows/s, M nnz/s and peak RSS.")
    b.add_argument("path", metavar="PATH")
    b.add_argument("--batch-size", type=int, default=1024, metavar="N")
    _add_storage_options(b)
    b.add_argument("--shuffle", action="store_true")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", action="store_true", help="print JSON")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    q = sub.add_parser("shuffle-check", help="how well the shuffle mixes a label into batches",
                       description="Score the shuffled DataLoader's batches by a label: mean "
                       "total-variation distance between each batch's label histogram and "
                       "all rows', and distinct labels per batch, beside a true permutation "
                       "and storage order.  Index math and the label array only, unless "
                       "--speed.")
    q.add_argument("path", metavar="STORE")
    q.add_argument("--label", required=True, metavar="NAME", help="the store label to score")
    _add_storage_options(q)
    q.add_argument("--batch-size", type=int, default=1024, metavar="N")
    q.add_argument("--seed", type=int, default=0, help="shuffle seed (and the permutation's)")
    q.add_argument("--epoch", type=int, default=0, metavar="E", help="epoch to score")
    q.add_argument("--world-size", type=int, default=1, metavar="W")
    q.add_argument("--rank", type=int, default=0, metavar="R")
    q.add_argument("--shuffle-buffer-bytes", type=parse_size, default=None, metavar="SIZE",
                   help="the shuffle's memory budget, e.g. 512M (default: the loader's)")
    q.add_argument("--shuffle-buffer-blocks", type=int, default=None, metavar="K",
                   help="a fixed number of blocks per shuffle unit instead of a budget")
    q.add_argument("--speed", action="store_true",
                   help="also stream one real pass and report rows/s")
    q.add_argument("--json", action="store_true", help="print JSON")
    return p


def _progress_flag(args: argparse.Namespace) -> bool | None:
    return False if getattr(args, "quiet", False) else None  # None: bar on a terminal only


# ------------------------------------------------------------------ commands

def cmd_convert(args: argparse.Namespace) -> int:
    from .conversion import convert

    if len(args.paths) < 2:
        raise InvalidInputError("convert needs at least one SRC and a DST")
    *srcs, dst = args.paths
    layout: dict[str, Any] = {}
    for name in ("compressor", "clevel", "chunk_bytes", "shard_bytes"):
        if getattr(args, name) is not None:
            layout[name] = getattr(args, name)
    if args.no_checksum:
        layout["checksum"] = False
    labels = [n for item in (args.labels or []) for n in item.split(",") if n]
    zero_based = {None: None, "auto": "auto", "yes": True, "no": False}[args.zero_based]
    src: Any = srcs[0] if len(srcs) == 1 else srcs
    memory = {} if args.memory_bytes is None else {"memory_bytes": args.memory_bytes}
    t0 = time.perf_counter()
    try:
        store = convert(
            src, dst, format=args.format, overwrite=args.overwrite,
            progress=_progress_flag(args), workers=args.workers, labels=labels or None,
            key=args.key, dtype=args.dtype, casting=args.casting, sparse=not args.dense,
            n_features=args.n_features,
            zero_based=zero_based, max_bytes=args.max_bytes, tmp_dir=args.tmp_dir,
            nan_policy=args.nan_policy, shuffle_rows=args.shuffle_rows,
            source_row_label=args.source_row_label, storage_options=args.storage_options,
            source_storage_options=(args.storage_options if args.source_storage_options is None
                                    else args.source_storage_options),
            **memory, **layout,
        )
    except StoreExistsError as exc:
        # The library's message names the Python keyword; here the switch is a flag.
        raise StoreExistsError(str(exc).replace("overwrite=True", "--overwrite")) from None
    dt = time.perf_counter() - t0
    n, m = store.shape
    labs = f", labels {list(store.labels)}" if len(store.labels) else ""
    shuffled = "" if args.shuffle_rows is None else f", rows shuffled (seed {args.shuffle_rows})"
    print(f"wrote {store.path}: {n} x {m}, nnz {store.nnz}, {store.dtype}{labs}{shuffled} "
          f"in {dt:.1f} s")
    return 0


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def cmd_info(args: argparse.Namespace) -> int:
    from .store import open as open_store

    store = open_store(args.path, mode="r", storage_options=args.storage_options)
    info = store.info()
    if args.plot:
        from .plot import plot_store

        try:
            info["plot"] = plot_store(store, args.plot, progress=_progress_flag(args))
        except ImportError as exc:  # matplotlib, an optional extra; the message names it
            raise SparseStoreError(str(exc)) from None
    if args.json:
        print(json.dumps(_json_safe(info), indent=2))
        return 0
    n, m = info["shape"]
    lines = [
        f"path:        {info['path']}",
        f"format:      {info['format']}",
        f"shape:       {n} x {m}",
        f"nnz:         {info['nnz']}",
        f"density:     {info['density']:.4g}",
        f"dtype:       {info['dtype']}",
        "chunks:      " + ", ".join(f"{k} {v}" for k, v in info["chunks"].items()),
    ]
    if info.get("layout"):
        lay = info["layout"]
        lines.append("layout:      " + ", ".join(f"{k}={lay[k]}" for k in sorted(lay)))
    ratio = info["compression_ratio"]
    lines.append(
        f"bytes:       {_human(info['bytes_stored'])} stored, "
        f"{_human(info['bytes_uncompressed'])} uncompressed"
        + (f" (ratio {ratio:.2f})" if ratio == ratio else "")
    )
    labs = info["labels"]
    lines.append("labels:      " + (", ".join(f"{k} {v['dtype']}{v['shape']}"
                                              for k, v in labs.items()) or "none"))
    if args.plot:
        lines.append(f"plot:        {info['plot']}")
    print("\n".join(lines))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        from .validate import validate_store
    except ImportError as exc:
        raise SparseStoreError(
            f"validation is not available in this installation ({exc})"
        ) from None
    # True: validate's own bar, shown on a terminal only.
    report = validate_store(args.path, deep=not args.quick, progress=not args.quiet,
                            storage_options=args.storage_options)
    ok = bool(getattr(report, "ok", report))
    summary = report.summary() if hasattr(report, "summary") else str(report)
    print(summary, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_upgrade(args: argparse.Namespace) -> int:
    from .writer import upgrade

    done = upgrade(args.path, progress=not args.quiet, storage_options=args.storage_options)
    if not done["upgraded"]:
        print(f"{done['path']}: already has a chunk manifest; nothing to do")
    else:
        absent = done.get("absent_chunks") or []
        extra = (f"; {len(absent)} chunk(s) were absent from storage ({', '.join(absent[:10])}"
                 f"{', ...' if len(absent) > 10 else ''}) and are now stored as the zeros they "
                 "read as. A store without a manifest cannot tell an all-zero chunk zarr never "
                 "wrote from one that was deleted: if files may have been lost, check those "
                 "rows or restore the store from a copy" if absent else "")
        print(f"{done['path']}: every chunk checked, manifest added{extra}")
    return 0


def _peak_rss_bytes() -> int:
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * (1 if sys.platform == "darwin" else 1024)
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        try:
            import psutil  # optional: only where the resource module is missing
        except ImportError:
            return 0
        return int(psutil.Process().memory_info().rss)


def cmd_bench(args: argparse.Namespace) -> int:
    from .loader import DataLoader
    from .store import open as open_store

    store = open_store(args.path, mode="r", storage_options=args.storage_options)
    loader = DataLoader(store, batch_size=args.batch_size, shuffle=args.shuffle,
                        seed=args.seed)
    rows = nnz = batches = 0
    t0 = time.perf_counter()
    with make_bar(_progress_flag(args), store.n_rows, "bench") as bar:
        for batch in loader.iter_batches():
            rows += batch.n_rows
            nnz += batch.nnz
            batches += 1
            bar.update(batch.n_rows)
    dt = max(time.perf_counter() - t0, 1e-9)
    result = {
        "path": store.path, "rows": rows, "nnz": nnz, "batches": batches, "seconds": dt,
        "rows_per_s": rows / dt, "mnnz_per_s": nnz / dt / 1e6,
        "peak_rss_bytes": _peak_rss_bytes(), "batch_size": args.batch_size,
        "shuffle": args.shuffle,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{rows} rows, {nnz} nnz in {batches} batches of {args.batch_size}"
              f"{' (shuffled)' if args.shuffle else ''}: {dt:.2f} s, "
              f"{result['rows_per_s']:,.0f} rows/s, {result['mnnz_per_s']:.1f} M nnz/s, "
              f"peak RSS {_human(result['peak_rss_bytes'])}")
    return 0


def cmd_shuffle_check(args: argparse.Namespace) -> int:
    from .loader import DataLoader
    from .mixing import shuffle_quality
    from .store import open as open_store

    store = open_store(args.path, mode="r", storage_options=args.storage_options)
    extra = {k: v for k, v in (("shuffle_buffer_bytes", args.shuffle_buffer_bytes),
                               ("shuffle_buffer_blocks", args.shuffle_buffer_blocks))
             if v is not None}
    loader = DataLoader(store, batch_size=args.batch_size, shuffle=True, seed=args.seed,
                        rank=args.rank, world_size=args.world_size, **extra)
    loader.set_epoch(args.epoch)
    report = shuffle_quality(loader, args.label, seed=args.seed, measure_speed=args.speed)
    if args.json:
        print(json.dumps(_json_safe(report.to_dict()), indent=2))
    else:
        print(f"{store.path}: label {args.label!r}, epoch {args.epoch}, "
              f"rank {args.rank}/{args.world_size}")
        print(report.table())
    return 0


COMMANDS = {"convert": cmd_convert, "info": cmd_info, "validate": cmd_validate,
            "upgrade": cmd_upgrade, "bench": cmd_bench, "shuffle-check": cmd_shuffle_check}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits 2 on bad usage)."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, (SparseStoreError, OSError)):
            exc = translate(exc, args.command, " ".join(_paths(args)))
            if not isinstance(exc, SparseStoreError):
                raise  # a bug: its traceback
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1


def _paths(args: argparse.Namespace) -> list[str]:
    """The paths a command names (for an error's message)."""
    return list(getattr(args, "paths", None) or [getattr(args, "path", "")])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
