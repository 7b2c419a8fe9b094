"""Per-batch numeric kernels shared by the framework adapters.

``coo_into`` writes a CSR batch's COO coordinates (row id, column id per value) into a
caller's buffer.  With numba installed (the ``tf`` extra brings it) this is one compiled
pass that releases the GIL, so several adapter threads build batches at once; without it,
numpy does the same in two passes holding the GIL for part of the time.  Both give the same
bytes.

``index_scan`` sums up a CSR block's column indices for the read-side check
(:func:`sparsestore.checks.check_column_indices`) in numpy: a pass checks each row once
per handle, and a compiled scan would save less than loading numba costs.

numba and its cached machine code take most of a second to load, which a fresh process
would otherwise pay in its import and its first batch.  So ``coo_into``'s kernel loads on
a background thread the first time a large batch wants it, for that batch's array types;
until it is there the numpy version runs, unless the caller asks to wait for it (the
framework adapters, which start loading it while their framework imports).
``ACCELERATED`` says whether numba will be used at all (installed, and not switched off by
``SPARSESTORE_NO_NUMBA=1``); :func:`warm` loads the kernel ahead and says whether it loads.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["ACCELERATED", "coo_into", "index_scan", "warm"]

ACCELERATED: bool = (not os.environ.get("SPARSESTORE_NO_NUMBA")
                     and importlib.util.find_spec("numba") is not None)
MIN_COMPILED = 1 << 16  # elements: below this numpy is about as fast, and numba is not loaded
JOIN_AT_EXIT_S = 10.0  # a load still running at exit finishes before the interpreter ends


def _kind(a: np.ndarray) -> tuple[str, int, str, bool, bool]:
    """What numba's type of ``a`` depends on: dtype, dimensions, layout as numba classifies
    it (C before F), writeable, aligned."""
    f = a.flags
    layout = "C" if f.c_contiguous else "F" if f.f_contiguous else "A"
    return a.dtype.str, a.ndim, layout, bool(f.writeable), bool(f.aligned)


class _Lazy:
    """A numba kernel that loads on a background thread, one set of argument types at a
    time; :meth:`ready` hands it out only for types already loaded, so no caller ever waits
    for a compile or a cache load."""

    def __init__(self, define: Callable[[Any], Any]) -> None:
        self._define = define
        self._fn: Any = None
        self._ready: set[tuple] = set()
        self.failed = False
        self.eager = False  # tests: load in the caller instead, so the compiled path runs
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._loading = threading.Lock()  # one load at a time; a waiting caller queues here
        self._queue: list[tuple] = []
        self._queued: set[tuple] = set()
        self._thread: threading.Thread | None = None

    def ready(self, *arrays: np.ndarray, wait: bool = False) -> Any:
        """The compiled kernel when it is loaded for these arrays' types, else None (having
        started that load in the background); with ``wait`` (or ``eager``), loaded here
        first."""
        key = tuple(_kind(a) for a in arrays)
        if key in self._ready:
            return self._fn
        if not ACCELERATED or self.failed:
            return None
        if wait or self.eager:
            self._load(key)
            return self._fn if key in self._ready else None
        with self._lock:
            if key not in self._queued:
                self._queued.add(key)
                self._queue.append(key)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, daemon=True,
                                                    name="sparsestore-numba")
                    self._thread.start()
        return None

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    return
                key = self._queue.pop(0)
            self._load(key)

    def _load(self, key: tuple) -> None:
        with self._loading:
            if key not in self._ready:
                self._load_now(key)

    def _load_now(self, key: tuple) -> None:
        try:
            import numba

            if self._fn is None:
                self._fn = self._define(numba)
            self._fn.compile(tuple(
                numba.types.Array(numba.from_dtype(np.dtype(dt)), nd, layout,
                                  readonly=not writeable, aligned=aligned)
                for dt, nd, layout, writeable, aligned in key))
            self._ready.add(key)
        except Exception:  # a numba that does not import or compile: numpy from now on
            self.failed = True

    def join(self, timeout: float | None) -> None:
        t = self._thread
        if t is not None:
            t.join(timeout)


def _numpy_coo_into(row_splits: np.ndarray, indices: np.ndarray, coords: np.ndarray) -> None:
    n_rows = row_splits.size - 1
    coords[:, 0] = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(row_splits))
    coords[:, 1] = indices


def _define_coo(numba: Any) -> Any:
    @numba.njit(nogil=True, cache=True)
    def coo_kernel(row_splits: Any, indices: Any, coords: Any) -> None:  # pragma: no cover
        base = row_splits[0]
        for r in range(row_splits.shape[0] - 1):
            for k in range(row_splits[r] - base, row_splits[r + 1] - base):
                coords[k, 0] = r
                coords[k, 1] = indices[k]

    return coo_kernel


_COO = _Lazy(_define_coo)


def coo_into(row_splits: np.ndarray, indices: np.ndarray, coords: np.ndarray,
             wait: bool = False) -> None:
    """Write ``coords[k] = (row of value k, indices[k])`` for a CSR batch.

    ``row_splits`` (int64, ``n_rows + 1``, may start above 0: the batch's values are then
    ``indices[0:row_splits[-1] - row_splits[0]]``), ``coords`` an int64 ``(nnz, >= 2)``
    array (only its first two columns are written; an int32 one where every row and
    column id fits, as JAX's 32-bit sparse indices want).  ``wait``: a large batch waits
    for the compiled kernel rather than run numpy while it loads (the adapters, which
    build every batch with it and start loading it when they are imported).
    """
    nnz = int(row_splits[-1] - row_splits[0]) if row_splits.size else 0
    if coords.shape[0] != nnz or indices.shape[0] != nnz or coords.ndim != 2:
        raise ValueError(
            f"coo_into: {nnz} values by row_splits, {indices.shape[0]} indices, coords of shape "
            f"{coords.shape}; they must agree"
        )
    if nnz == 0:
        return
    splits = np.asarray(row_splits, dtype=np.int64)
    kernel = (_COO.ready(splits, indices, coords, wait=wait)
              if nnz >= MIN_COMPILED or _COO.eager else None)
    if kernel is None:
        _numpy_coo_into(splits - splits[0], indices, coords)
    else:
        kernel(splits, indices, coords)


def index_scan(indices: np.ndarray, ptr: np.ndarray) -> tuple[int, int, int]:
    """``(min, max, descents)`` of non-empty CSR column ``indices``; a descent is a value
    not above the one before it inside a row (unsorted or duplicated).

    ``ptr`` (int64) holds the rows' pointers, ``ptr[0]`` at ``indices[0]``.  Rows hold
    sorted, unique indices in ``[0, n_cols)`` exactly when ``descents == 0``,
    ``min >= 0`` and ``max < n_cols``.
    """
    n = indices.size
    descents = int(np.count_nonzero(indices[1:] <= indices[:-1]))
    if descents:  # those where a (non-empty) row starts are allowed
        starts = ptr[1:-1] - ptr[0]
        starts = starts[(starts > 0) & (starts < n) & (ptr[2:] > ptr[1:-1])]
        descents -= int(np.count_nonzero(indices[starts] <= indices[starts - 1]))
    return int(indices.min()), int(indices.max()), descents


def warm(wait: bool = False, timeout: float = 120.0) -> bool:
    """Start loading the compiled ``coo_into`` for the usual types (int32 and int64
    indices, int64 and int32 coordinates) and, with ``wait``, wait for it; whether the
    compiled kernel is (or, without ``wait``, may become) the one in use."""
    splits = np.zeros(2, np.int64)
    for dt in (np.int32, np.int64):
        ind = np.zeros(1, dt)
        for cdt in (np.int64, np.int32):
            _COO.ready(splits, ind, np.zeros((1, 2), cdt))
    if wait:
        _COO.join(timeout)
    return ACCELERATED and not _COO.failed and (not wait or bool(_COO._ready))


# The loading thread stays in the parent of a fork (types loaded there carry over), and a
# load still running at exit finishes: numba is never left half-loaded at shutdown.
os.register_at_fork(after_in_child=_COO._reset)
atexit.register(_COO.join, JOIN_AT_EXIT_S)
