"""Shared pieces of the benchmark suite: sizes, synthetic data, the case registry, RSS.

Every case is a function ``fn(ctx) -> dict`` registered with :func:`case`.  It does its own
untimed setup (opening files, loading an in-memory baseline), times only the work being
compared and returns at least ``rows``, ``nnz`` and ``seconds`` (plus any extras).  The
runner measures peak RSS growth around the whole call (setup included: an in-memory
baseline pays for holding the matrix) with :class:`RssSampler`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import scipy.sparse as sp

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before any TensorFlow import

MiB = 2**20


# ------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class Size:
    """One benchmark size: the reference matrix and how long slow baselines may run."""

    name: str
    n_rows: int
    n_cols: int
    nnz_per_row: int
    n_shards: int  # .npz shards for the interleave baseline and the convert benchmark
    time_budget: float  # seconds a slow baseline may stream before it is cut (partial)
    keras_reps: int  # timed Keras epochs per variant (after one warm-up epoch)
    scaling: tuple[int, ...] = (1, 4, 16)  # row multipliers of the scaling benchmark
    scaling_base: int = 0  # rows of the x1 scaling matrix


SIZES = {
    # The suite's reference matrix: 200k x 30k, ~100 nnz/row, float32 (~20M nnz).
    "full": Size("full", 200_000, 30_000, 100, 64, 60.0, 3, scaling_base=50_000),
    "quick": Size("quick", 50_000, 30_000, 100, 64, 10.0, 2, scaling_base=12_500),
    "tiny": Size("tiny", 3_000, 1_000, 20, 8, 1.5, 1, scaling_base=1_000),
}

BATCH_SIZE = 1024
BLOCK_ROWS = 16_384
SEED = 20_240_607


# ------------------------------------------------------------------ context


@dataclass
class Ctx:
    """What every case needs to know; JSON-serialisable so a subprocess can rebuild it."""

    work: str
    size: Size
    batch_size: int = BATCH_SIZE
    paths: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # facts from the setup (nnz, sizes)

    def path(self, key: str) -> Path:
        return Path(self.paths[key])

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"]["scaling"] = list(self.size.scaling)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Ctx:
        s = dict(d["size"])
        s["scaling"] = tuple(s["scaling"])
        return cls(work=d["work"], size=Size(**s), batch_size=d["batch_size"],
                   paths=d["paths"], meta=d.get("meta", {}))


# ------------------------------------------------------------------ data


def csr_from_keys(keys: np.ndarray, rows: int, n_cols: int,
                  rng: np.random.Generator) -> sp.csr_matrix:
    """A canonical float32 CSR of ``rows`` rows from sorted, unique flat positions
    ``row * n_cols + col``, with small positive integer values drawn from ``rng``."""
    r, c = np.divmod(keys, n_cols)
    indptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=rows), out=indptr[1:])
    values = (1 + rng.geometric(0.5, keys.size)).astype(np.float32)
    X = sp.csr_matrix((values, c.astype(np.int32), indptr), shape=(rows, n_cols))
    X.has_canonical_format = True
    return X


def matrix_blocks(
    n_rows: int, n_cols: int, nnz_per_row: int, seed: int = SEED, block_rows: int = BLOCK_ROWS
) -> Iterator[tuple[sp.csr_matrix, dict[str, np.ndarray]]]:
    """Deterministic row blocks ``(csr float32, {"y": float32 0/1})`` of a count-like matrix.

    Row lengths are Poisson(nnz_per_row); column ids uniform (sorted, unique per row);
    values small positive counts (1 + geometric), like single-cell or bag-of-words data.
    Block ``k`` depends only on ``(seed, k)``, so a 16x larger matrix starts with the
    smaller one's rows and is generated without holding it whole.
    """
    w = np.random.default_rng(seed).standard_normal(n_cols).astype(np.float32)
    for k, start in enumerate(range(0, n_rows, block_rows)):
        rng = np.random.default_rng([seed, k])
        rows = min(block_rows, n_rows - start)
        lengths = np.minimum(rng.poisson(nnz_per_row, rows), n_cols)
        row_ids = np.repeat(np.arange(rows, dtype=np.int64), lengths)
        keys = np.unique(row_ids * n_cols + rng.integers(0, n_cols, row_ids.size))
        X = csr_from_keys(keys, rows, n_cols, rng)
        y = (X @ w > np.median(X @ w)).astype(np.float32)
        yield X, {"y": y}


def make_matrix(n_rows: int, n_cols: int, nnz_per_row: int, seed: int = SEED) -> sp.csr_matrix:
    """The whole matrix of :func:`matrix_blocks` in memory (for in-memory baselines)."""
    return sp.vstack([X for X, _ in matrix_blocks(n_rows, n_cols, nnz_per_row, seed)],
                     format="csr")


def load_matrix(ctx: Ctx) -> sp.csr_matrix:
    """The reference matrix from the setup's uncompressed .npz (fast; for in-memory cases)."""
    X = sp.load_npz(ctx.path("matrix_npz")).tocsr()
    X.has_canonical_format = True
    return X


def dir_bytes(path: str | Path) -> int:
    """Bytes of all files under ``path`` (or of the file itself)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def rmtree(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def coo_parts(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(indices (nnz,2) int64, values, dense_shape)`` of a CSR block: the usual Python recipe.

    This is what forum answers do to hand scipy to ``tf.SparseTensor``: ``tocoo`` and stack
    row/col ids -- per batch, in Python.
    """
    coo = X.tocoo()
    idx = np.stack([coo.row, coo.col], axis=1).astype(np.int64)
    return idx, coo.data, np.array(X.shape, dtype=np.int64)


def store_with_matrix(
    path: str | Path, n_rows: int, n_cols: int, nnz_per_row: int
) -> tuple[Any, sp.csr_matrix, np.ndarray]:
    """A float32 store of :func:`matrix_blocks` at ``path``, and the same matrix ``X`` and
    labels ``y`` (``(n_rows, 1)``) in memory for the in-memory side of a comparison."""
    import sparsestore

    blocks = list(matrix_blocks(n_rows, n_cols, nnz_per_row))
    X = sp.vstack([b for b, _ in blocks], format="csr")
    y = np.concatenate([lab["y"] for _, lab in blocks])[:, None]
    store = sparsestore.write_blocks(path, blocks, n_cols=n_cols, dtype=np.float32,
                                     overwrite=True)
    return store, X, y


def write_timed(path: str | Path, blocks: Iterable[Any], n_cols: int, **layout: Any
                ) -> dict[str, Any]:
    """Write a float32 store of ``blocks`` (with ``layout`` options) at ``path``; returns its
    facts: shape, nnz, write time and chunks."""
    import sparsestore

    t0 = time.perf_counter()
    store = sparsestore.write_blocks(path, blocks, n_cols=n_cols, dtype=np.float32,
                                     overwrite=True, **layout)
    return {"rows": store.n_rows, "cols": store.n_cols, "nnz": store.nnz,
            "nnz_per_row": store.nnz / store.n_rows, "write_s": time.perf_counter() - t0,
            "chunks": {k: list(v) for k, v in store.info()["chunks"].items()}}


def idiom_dataset(tf: Any, st: Any, y: Any = None, batch_size: int = BATCH_SIZE) -> Any:
    """The in-memory TensorFlow idiom the ratios compare against: the whole matrix as one
    ``SparseTensor`` ``st`` (with labels ``y``), ``from_tensor_slices(...).batch``."""
    el = st if y is None else (st, tf.constant(y))
    return tf.data.Dataset.from_tensor_slices(el).batch(batch_size).prefetch(tf.data.AUTOTUNE)


# ------------------------------------------------------------------ timing


class Skip(Exception):
    """A case cannot run here (a dependency or a sparsestore feature is missing)."""


def need(module: str, feature: str | None = None) -> Any:
    """Import ``module`` (and check ``feature`` on it) or skip the case, naming what is missing."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise Skip(f"{module} not importable ({exc})") from None
    if feature is not None:
        try:
            return getattr(mod, feature)
        except (AttributeError, ImportError) as exc:
            raise Skip(f"{module}.{feature} not available ({exc})") from None
    return mod


def stream(batches: Iterable[Any], count: Callable[[Any], tuple[int, int]],
           budget: float) -> dict[str, Any]:
    """Time one pass over ``batches``; stop after ``budget`` seconds (then ``partial``).

    ``count(batch) -> (rows, nnz)``.  Returns rows, nnz, seconds and batches consumed.
    """
    rows = nnz = n = 0
    t0 = time.perf_counter()
    it = iter(batches)
    try:
        for b in it:
            r, z = count(b)
            rows += r
            nnz += z
            n += 1
            if time.perf_counter() - t0 > budget:
                break
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return {"rows": rows, "nnz": nnz, "seconds": time.perf_counter() - t0, "batches": n}


def count_sparse_tensor(x: Any) -> tuple[int, int]:
    """Rows and nnz of a ``tf.sparse.SparseTensor`` batch (or ``(x, labels...)``)."""
    if isinstance(x, tuple):
        x = x[0]
    return int(x.dense_shape[0]), int(x.values.shape[0])


# ------------------------------------------------------------------ RSS


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


class RssSampler:
    """Peak RSS of this process while active, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start_rss = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        gc.collect()
        self.start_rss = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start_rss


def max_rss_bytes() -> int:
    """The process's lifetime peak RSS (``ru_maxrss``; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Case:
    """One benchmark: a name, the table it belongs to, a one-line description, the function."""

    name: str
    group: str  # stream | io | train | convert | dask | scaling
    label: str
    fn: Callable[[Ctx], dict[str, Any]]
    description: str
    baseline: bool = False  # one of the comparison baselines of the streaming table
    ours: bool = False  # a sparsestore streaming path
    needs: tuple[str, ...] = ()  # modules imported before RSS is measured (not charged)

    def record(self, **status: Any) -> dict[str, Any]:
        """The start of this case's result record (its identity), then ``status``."""
        return {"name": self.name, "group": self.group, "label": self.label,
                "description": self.description, "baseline": self.baseline, "ours": self.ours,
                **status}


CASES: dict[str, Case] = {}
BASE_NEEDS = ("numpy", "scipy.sparse", "zarr", "sparsestore")
TF_NEEDS = ("tensorflow", "sparsestore.loader", "sparsestore.adapters.tensorflow")


def case(name: str, group: str, label: str, description: str, *, baseline: bool = False,
         ours: bool = False, needs: tuple[str, ...] = ()
         ) -> Callable[[Callable[[Ctx], dict[str, Any]]], Any]:
    """Register ``fn`` as benchmark ``name``; ``needs`` are imported before RSS is sampled."""

    def deco(fn: Callable[[Ctx], dict[str, Any]]) -> Callable[[Ctx], dict[str, Any]]:
        if name in CASES:
            raise ValueError(f"benchmark case {name!r} registered twice")
        CASES[name] = Case(name, group, label, fn, description, baseline, ours,
                           BASE_NEEDS + needs)
        return fn

    return deco


def run_case(name: str, ctx: Ctx) -> dict[str, Any]:
    """Run one registered case here, with RSS measured around it; never raises."""
    c = CASES[name]
    out = c.record()
    for mod in c.needs:  # library imports are not the case's memory
        with contextlib.suppress(ImportError):  # else the case skips itself, naming it
            importlib.import_module(mod)
    try:
        with RssSampler() as rss:
            metrics = c.fn(ctx)
        out.update(metrics)
        out["status"] = "ok"
        out["rss_growth_mib"] = rss.growth / MiB
        out["rss_start_mib"] = rss.start_rss / MiB
        out["peak_rss_mib"] = max_rss_bytes() / MiB
    except Skip as exc:
        out.update(status="skipped", reason=str(exc))
    except Exception as exc:  # a broken case is reported, not fatal to the suite
        out.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
    return out


# ------------------------------------------------------------------ machine


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return "not installed"


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, OS and library versions (for the results table)."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    pkgs = ["sparsestore", "numpy", "scipy", "zarr", "numcodecs", "zarrs", "tensorflow-cpu",
            "keras", "anndata", "h5py", "dask", "psutil", "matplotlib"]
    return {
        "cpu": cpu,
        "cores": usable,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "commit": commit,
        "versions": {p: _version(p) for p in pkgs},
        "load_avg": load_avg(),
    }


def load_avg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded (a shared box's noise, for the record)."""
    return [round(x, 2) for x in os.getloadavg()]


def child(module: str, *args: Any, timeout: float | None = None, python: str = sys.executable,
          env: dict[str, str] | None = None) -> Any:
    """``python -m benchmarks.MODULE ARGS`` in a fresh interpreter (its memory and imports its
    own; ``python``, with ``env`` added to the environment), from the repository root;
    returns the JSON its last line of output holds.  Raises ``RuntimeError`` (the exit status
    and the end of stderr) if it fails, and ``subprocess.TimeoutExpired`` past ``timeout``
    seconds."""
    cmd = [python, "-m", f"benchmarks.{module}", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout,
                          cwd=Path(__file__).resolve().parent.parent,
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dump_json(obj: Any, path: str | Path | None = None, indent: int | None = 1) -> str:
    """``obj`` as JSON (numpy scalars and paths included), written to ``path`` if given."""
    text = json.dumps(obj, indent=indent, default=_json_default)
    if path is not None:
        Path(path).write_text(text)
    return text


def reproduce_command(module: str, parser: Any, args: Any, options: Iterable[str]) -> str:
    """``python -m module`` with each of ``options`` (argparse ``dest`` names) that differs
    from ``parser``'s default (a flag alone when it is ``True``), so a result file says
    exactly how it was made."""
    given = [f"--{name.replace('_', '-')}" + ("" if value is True else f" {value}")
             for name in options
             if (value := getattr(args, name)) != parser.get_default(name)]
    return " ".join([f"python -m {module}", *given])


# Where a standalone benchmark writes unless told otherwise: a git-ignored scratch folder,
# so a run never rewrites the committed results the README cites.  Those are regenerated on
# purpose with ``--out benchmarks/results``.
SCRATCH_OUT = Path(__file__).resolve().parent / "out"
COMMITTED_OUT = "benchmarks/results"


def add_out_argument(parser: Any) -> None:
    """``--out DIR`` for a benchmark's result files (default :data:`SCRATCH_OUT`)."""
    parser.add_argument(
        "--out", default=str(SCRATCH_OUT),
        help=f"folder for the .json/.md results (default: benchmarks/out, git-ignored; "
             f"--out {COMMITTED_OUT} replaces the committed ones)")


def quiet_tf_retracing(tf: Any) -> None:
    """Drop TensorFlow's "triggered tf.function retracing" warnings.

    A benchmark builds one ``tf.function`` per dataset on purpose (each is traced once,
    outside the timed rounds); TensorFlow counts those traces together and warns as if
    one function were retraced in a loop.
    """
    class _NoRetracing(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "tf.function retracing" not in record.getMessage()

    tf.get_logger().addFilter(_NoRetracing())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
