"""Dask integration: a store as a lazy dask array of scipy CSR row blocks, and back.

``to_dask(store)`` (also ``store.to_dask()``) decodes each storage chunk once, in its own
task, and assembles row blocks (:class:`~sparsestore.dask_blocks.CSRBlock`, which dask can
reduce; ndarrays for dense stores) from the chunks they overlap; tasks carry the store's
path, never data.  On object storage, where each request waits tens of milliseconds,
one task reads a run of storage chunks (:func:`_read_group`: their requests in flight
together) and each chunk's task takes its piece; a worker opens a store once per commit,
for every graph over it.  Not supported: an integer row (``darr[5]``; use ``darr[5:6]``).
The other direction, a dask array written as a store, is :mod:`sparsestore.dask_write`.
Timings: ``benchmarks/results/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph

from .checks import check_column_indices, check_row_pointers
from .chunks import ChunkDecoder, read_slice
from .dask_blocks import CSCBlock, CSRBlock, as_blocks
from .errors import CorruptStoreError, InvalidInputError, StoreChangedError
from .fetch import BUDGET_BYTES, prefetch_chunks
from .layout import DENSE_ARRAY

__all__ = ["CSCBlock", "CSRBlock", "as_blocks", "current_client", "to_dask"]

# ------------------------------------------------------------------ to_dask

_OPEN: OrderedDict[tuple, Any] = OrderedDict()
_OPEN_LOCK = threading.Lock()
_OPEN_CAP = 32
#: Decoded bytes one read task on object storage holds at most (:func:`_group_size`).
GROUP_BYTES = 32 * 2**20
# Held while a task reopens a store (one lock per hash of its source): one thread of a
# worker opens it, the others wait for its arrays instead of opening it again.
_REOPENING = tuple(threading.Lock() for _ in range(16))


class _Chunks(ChunkDecoder):
    """Whole storage chunks of one 1-D zarr array, decoded in the calling task.

    :class:`~sparsestore.chunks.ChunkDecoder` does the work (direct CRC32C + Blosc for the
    layouts sparsestore writes on local disk, zarr otherwise); this adds the task's view:
    elements ``[lo, hi)`` of chunk ``k`` with ``room`` spare slots after them for the row
    block that starts in this chunk and ends past it.
    """

    def read(self, k: int, lo: int, hi: int, room: int = 0) -> np.ndarray:  # type: ignore[override]
        """Elements ``[lo, hi)`` (chunk ``k``) in a new array with ``room`` spare slots after."""
        out = np.empty(max(self.chunk, hi - lo + room), self.dtype)
        self.decode_into(k, out)
        return out[: hi - lo + room]


class _Source:
    """What a task needs to open the store on a worker: its path, never its data."""

    def __init__(self, store: Any, token: str) -> None:
        self.path = store.path
        self.storage_options = store.storage_options
        self.generation = store.generation
        # The commit it reads, which a reopened store is pinned to.
        self.attrs = store.committed_attrs
        self.token = token
        # Arrays opened for one graph serve every graph over the same commit of the store
        # (a worker reopens it once, not once per computation): keyed by the commit.
        self.commit = hashlib.sha256(
            json.dumps(self.attrs, sort_keys=True, default=str).encode()).hexdigest()
        arrays = store.arrays
        self.expect = {k: (str(a.dtype), tuple(a.chunks)) for k, a in arrays.items()}

    def _key(self, name: str) -> tuple:
        opts = json.dumps(self.storage_options, sort_keys=True, default=str)
        return (self.path, opts, name, self.commit)

    def prime(self, arrays: Mapping[str, Any]) -> None:
        """Let tasks in this process use the arrays the caller already has open."""
        with _OPEN_LOCK:
            for name, arr in arrays.items():
                _OPEN[self._key(name)] = _Chunks(arr, name)
                _OPEN.move_to_end(self._key(name))
            while len(_OPEN) > _OPEN_CAP:
                _OPEN.popitem(last=False)

    def _cached(self, key: tuple) -> _Chunks | None:
        with _OPEN_LOCK:
            got = _OPEN.get(key)
            if got is not None:
                _OPEN.move_to_end(key)
        return got

    def chunks(self, name: str, need: int) -> _Chunks:
        """Array ``name`` with its chunk decoder, opened once per process (reopened if it grew)."""
        key = self._key(name)
        got = self._cached(key)
        if got is not None and got.arr.shape[0] >= need:
            return got
        with _REOPENING[hash(self._key("")) % len(_REOPENING)]:
            got = self._cached(key)
            if got is None or got.arr.shape[0] < need:
                self._reopen(name, need)
                got = self._cached(key)
        assert got is not None
        return got

    def _reopen(self, name: str, need: int) -> None:
        """Open the store at the pinned commit (once for all its arrays) and keep its arrays."""
        from .store import reopen_at

        st = reopen_at(self.path, self.storage_options, self.attrs)
        if st.generation != self.generation:
            raise StoreChangedError(
                f"{self.path} was replaced by another store since this dask array was "
                "made; call store.to_dask() again"
            )
        arrays = st.arrays
        for n, arr in arrays.items():
            if (str(arr.dtype), tuple(arr.chunks)) != self.expect.get(n) or (
                    n == name and arr.shape[0] < need):
                raise CorruptStoreError(
                    f"{self.path} changed since this dask array was made (array {n!r}); "
                    "call store.to_dask() again"
                )
        self.prime(arrays)

    def array(self, name: str, need: int) -> Any:
        """The zarr array ``name`` (see :meth:`chunks`)."""
        return self.chunks(name, need).arr


def _read_chunks(
    src: _Source, names: str, k: int, lo: int, hi: int, room: int
) -> tuple[np.ndarray, ...]:
    """Task: storage chunk ``k`` (elements ``[lo, hi)``) of each array in ``names``
    ("data+indices" when both share a chunk grid), each decoded once, with ``room`` spare
    slots after it for the row block that starts in this chunk and ends past it."""
    return tuple(src.chunks(n, hi).read(k, lo, hi, room) for n in names.split("+"))


def _read_group(
    src: _Source, names: str, spans: tuple[tuple[int, int, int, int], ...]
) -> list[tuple[np.ndarray, ...]]:
    """Task: storage chunks ``(k, lo, hi, room)`` of each array in ``names`` (as
    :func:`_read_chunks` reads one), requested together from object storage
    (:func:`~sparsestore.fetch.prefetch_chunks`: one round trip for all of them, within the
    store's byte budget) and decoded as their bytes come."""
    need = max(hi for _, _, hi, _ in spans)
    arrays = [src.chunks(n, need) for n in names.split("+")]
    pending = prefetch_chunks([(a, [k for k, _, _, _ in spans]) for a in arrays])
    try:
        return [tuple(a.read(k, lo, hi, room) for a in arrays) for k, lo, hi, room in spans]
    finally:
        if pending is not None:
            pending.release()


def _head(piece: tuple[np.ndarray, ...], n: int) -> tuple[np.ndarray, ...]:
    """Task: copies of the first ``n`` elements of a decoded chunk, for the block before
    it (on a cluster only these move between workers, not the whole chunk)."""
    return tuple(p[:n].copy() for p in piece)


def _join(j: int, lo: int, hi: int, spans: tuple, *parts: tuple[np.ndarray, ...]) -> np.ndarray:
    """Elements ``[lo, hi)`` of array ``j`` of consecutive chunks (``spans``: their ranges).

    The first chunk was decoded with room for the elements past its end: those are copied
    in behind it (from whole chunks or heads) and the result is a view of it, so only the
    straddling tail is ever copied.
    """
    a0, b0 = spans[0]
    first = parts[0][j]
    if hi <= b0:
        return first[lo - a0 : hi - a0]
    pos = b0 - a0
    for (a, b), p in zip(spans[1:], parts[1:], strict=True):
        take = min(hi, b) - a
        first[pos : pos + take] = p[j][:take]
        pos += take
    return first[lo - a0 : pos]


def _csr_block(
    n_cols: int, r0: int, r1: int, ptr_spans: tuple, ptr_parts: list, data: np.ndarray,
    indices: np.ndarray, where: str = "a dask block", chunk: int = 0,
) -> CSRBlock:
    """Rows ``[r0, r1 - 1)`` as a CSR block: ``indptr`` entries ``[r0, r1)`` from its chunks
    (``where``: the store's path, ``chunk``: its indices chunk length, for errors)."""
    parts = []
    for (a, b), p in zip(ptr_spans, ptr_parts, strict=True):
        lo, hi = max(r0, a), min(r1, b)
        parts.append(p[0][lo - a : hi - a])
    ptr = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if ptr.size > 1 and (np.diff(ptr) < 0).any() or int(ptr[-1] - ptr[0]) != data.size:
        check_row_pointers(ptr, int(ptr[0]) + data.size, "indptr of a dask block", r0)
        raise CorruptStoreError(f"rows {r0}:{r1 - 1}: indptr does not match the values read")
    check_column_indices(indices, ptr, n_cols, where, r0, chunk=chunk)
    # Rebased in a fresh array of the indices' dtype (what scipy would convert it to).
    dt = indices.dtype if indices.dtype.kind == "i" else np.dtype(np.int64)
    if int(ptr[-1] - ptr[0]) > np.iinfo(dt).max:
        dt = np.dtype(np.int64)
    ptr = np.subtract(ptr, ptr[0], dtype=dt)
    return CSRBlock((data, indices, ptr), shape=(r1 - r0 - 1, n_cols))


def _dense_block(src: _Source, a: int, b: int) -> np.ndarray:
    return read_slice(src.array(DENSE_ARRAY, b), a, b, name=DENSE_ARRAY)


def _empty_block(n_cols: int, dtype: str, dense: bool) -> Any:
    if dense:
        return np.empty((0, n_cols), dtype=dtype)
    return CSRBlock((0, n_cols), dtype=dtype)


def _dense_bounds(store: Any, chunk_rows: int | None) -> np.ndarray:
    """Row block boundaries of a dense store: every ``chunk_rows`` rows or storage chunk."""
    n = store.n_rows
    step = chunk_rows or int(store.arrays[DENSE_ARRAY].chunks[0])
    return np.unique(np.r_[np.arange(0, n, step, dtype=np.int64), n])


def _plan(store: Any, ptr: _Chunks, chunk_rows: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Row block boundaries and the ``indptr`` values at them, in one pass over ``indptr``.

    Boundaries fall every ``chunk_rows`` rows, or (default) one block per storage chunk
    of ``data``: the rows whose first value lies in that chunk.  ``indptr`` is streamed
    chunk by chunk, each decoded once.
    """
    n, nnz = store.n_rows, store.nnz
    if chunk_rows is not None:
        want = np.r_[np.arange(0, n, chunk_rows, dtype=np.int64), n]
        targets = np.empty(0, dtype=np.int64)
    else:
        want = np.array([0, n], dtype=np.int64)
        c = int(store.arrays["data"].chunks[0])
        targets = np.arange(1, -(-nnz // c), dtype=np.int64) * c
    rows: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    ti = 0
    cp = ptr.chunk
    # On object storage the next chunks are requested together, a window at a time.
    window = max(1, min(64, BUDGET_BYTES // max(1, cp * ptr.dtype.itemsize)))
    ahead, pending = 0, None
    try:
        for s in range(0, n + 1, cp):
            e = min(s + cp, n + 1)
            sel = want[np.searchsorted(want, s) : np.searchsorted(want, e)] - s
            if ti == targets.size and not sel.size:
                continue  # nothing needed from this chunk
            k = s // cp
            if ptr.remote is not None and k >= ahead:
                if pending is not None:
                    pending.release()
                ahead = min(k + window, -(-(n + 1) // cp))
                pending = prefetch_chunks([(ptr, range(k, ahead))])
            ti = _plan_chunk(ptr.read(k, s, e), s, n, e, sel, targets, ti, rows, vals)
    finally:
        if pending is not None:
            pending.release()
    bounds, first = np.unique(np.concatenate(rows), return_index=True)
    return bounds, np.concatenate(vals).astype(np.int64)[first]


def _plan_chunk(seg: np.ndarray, s: int, n: int, e: int, sel: np.ndarray,
                targets: np.ndarray, ti: int, rows: list, vals: list) -> int:
    """One ``indptr`` chunk's part of :func:`_plan` (``seg``: entries ``[s, e)``): adds the
    rows and values it finds; returns the next target's position."""
    starts = seg[: max(0, min(e, n) - s)]  # where rows s .. min(e, n) - 1 start
    if ti < targets.size and starts.size:
        # The first row starting at or after each data chunk start.
        j = int(np.searchsorted(targets, starts[-1], side="right"))
        found = np.searchsorted(starts, targets[ti:j], side="left")
        rows.append(s + found)
        vals.append(seg[found])
        ti = j
    rows.append(s + sel)
    vals.append(seg[sel])
    return ti


def _chunk_tasks(
    dsk: dict, name: str, src: _Source, names: str, chunk: int, limit: int, ranges: list,
    join: bool = True, group: int = 1,
) -> list[tuple[tuple, list]]:
    """Per range ``[lo, hi)``: the spans and keys of the chunk tasks covering it.

    Adds one task per storage chunk (of every array in ``names``).  With ``join``, a chunk
    in which a range starts and past whose end it runs is decoded with room for the rest
    of that range, and a chunk in which a range ends while the next one starts there is
    passed to the first range as a small ``_head`` task (see :func:`_join`).  With
    ``group`` > 1 (object storage) every ``group`` consecutive chunks are read by one
    :func:`_read_group` task, their requests in flight together, and each chunk's task
    takes its piece of that task's result.
    """
    tag = f"{name}-{names}"
    groups: dict[int, list[tuple[int, int, int, int]]] = {}
    room: dict[int, int] = {}
    starts: set[int] = set()
    for lo, hi in ranges if join else ():
        if hi > lo:
            k = lo // chunk
            starts.add(k)
            end = min((k + 1) * chunk, limit)
            if hi > end:
                room[k] = hi - end
    out = []
    for lo, hi in ranges:
        spans, keys = [], []
        if hi > lo:
            k0 = lo // chunk
            for k in range(k0, (hi - 1) // chunk + 1):
                key = (tag, k)
                a, b = k * chunk, min((k + 1) * chunk, limit)
                if key not in dsk:
                    if group > 1:
                        groups.setdefault(k // group, []).append((k, a, b, room.get(k, 0)))
                        dsk[key] = (operator.getitem, (tag + "-group", k // group),
                                    len(groups[k // group]) - 1)
                    else:
                        dsk[key] = (_read_chunks, src, names, k, a, b, room.get(k, 0))
                if k > k0 and k in starts:  # shared with the range starting there
                    dsk[(tag + "-head", k)] = (_head, key, min(hi, b) - a)
                    key = (tag + "-head", k)
                spans.append((a, b))
                keys.append(key)
        out.append((tuple(spans), keys))
    for g, spans_g in groups.items():
        dsk[(tag + "-group", g)] = (_read_group, src, names, tuple(spans_g))
    return out


def _group_size(arrays: list[Any], n_chunks: int) -> int:
    """Storage chunks per read task for arrays read together: 1 on local disk; on object
    storage enough for every scheduler thread to get a share of the chunks, each task
    holding at most :data:`GROUP_BYTES` decoded (see :func:`_read_group`)."""
    if n_chunks <= 1 or any(ChunkDecoder(a).remote is None for a in arrays):
        return 1
    per_chunk = sum(int(a.chunks[0]) * np.dtype(a.dtype).itemsize for a in arrays)
    threads = _scheduler_threads()
    return max(1, min(-(-n_chunks // threads), GROUP_BYTES // max(1, per_chunk)))


def current_client() -> Any:
    """The distributed Client dask would use now, or None for local schedulers."""
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - distributed not installed
        return None
    sched = dask.base.get_scheduler()
    owner = getattr(sched, "__self__", None)
    return owner if isinstance(owner, Client) else None


def _scheduler_threads() -> int:
    """Threads the current dask scheduler runs tasks on (a distributed client's, in all)."""
    client = current_client()
    if client is not None:
        with contextlib.suppress(Exception):
            return max(1, sum(client.nthreads().values()))
    return max(1, int(dask.config.get("num_workers", None) or dask.system.CPU_COUNT))


def to_dask(store: Any, chunk_rows: int | None = None) -> da.Array:
    """A lazy dask array of the store's rows (chunks: :class:`CSRBlock`, or ndarray if dense).

    ``chunk_rows`` sets a fixed number of rows per block; by default blocks follow the
    storage chunks of ``data`` (or of ``X``).  Each storage chunk is decoded once per
    computation; tasks open the store from its path on whichever worker runs them.
    """
    from .store import SparseStore
    from .store import open as open_store

    if not isinstance(store, SparseStore):
        store = open_store(store)
    if chunk_rows is not None and (
        isinstance(chunk_rows, (bool, np.bool_))
        or not isinstance(chunk_rows, (int, np.integer))
        or chunk_rows < 1
    ):
        raise InvalidInputError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    n, m = store.shape
    dtype = store.dtype
    token = uuid.uuid4().hex
    name = f"sparsestore-{token}"
    src = _Source(store, token)
    dense = store.is_dense
    meta = np.empty((0, m), dtype=dtype) if dense else CSRBlock((0, m), dtype=dtype)
    dsk: dict[Any, Any] = {}
    if n == 0:
        dsk[(name, 0, 0)] = (_empty_block, m, dtype.str, dense)
        chunks: tuple = ((0,), (m,))
    elif dense:
        bounds = _dense_bounds(store, chunk_rows)
        chunks = (tuple(np.diff(bounds).tolist()), (m,))
        for i in range(bounds.size - 1):
            dsk[(name, i, 0)] = (_dense_block, src, int(bounds[i]), int(bounds[i + 1]))
    else:
        src.prime(store.arrays)
        bounds, at = _plan(store, src.chunks("indptr", n + 1), chunk_rows)
        chunks = (tuple(np.diff(bounds).tolist()), (m,))
        _sparse_graph(dsk, name, src, store, bounds, at)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    return da.Array(graph, name, chunks, meta=meta)


def _sparse_graph(
    dsk: dict, name: str, src: _Source, store: Any, bounds: np.ndarray, at: np.ndarray
) -> None:
    """Tasks of a CSR store: one per storage chunk, one per row block (``at``: ``indptr``
    at the block ``bounds``)."""
    arrays = store.arrays
    n, m = store.shape
    nnz = store.nnz
    rows = [(int(a), int(b) + 1) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    vals = [(int(a), int(b)) for a, b in zip(at[:-1], at[1:], strict=True)]
    cp = int(arrays["indptr"].chunks[0])
    ptr = _chunk_tasks(dsk, name, src, "indptr", cp, n + 1, rows, join=False,
                       group=_group_size([arrays["indptr"]], -(-(n + 1) // cp)))
    cd, ci = int(arrays["data"].chunks[0]), int(arrays["indices"].chunks[0])
    if cd == ci:  # one task decodes both (the usual layout: equal item sizes)
        both = [arrays["data"], arrays["indices"]]
        dat = ind = _chunk_tasks(dsk, name, src, "data+indices", cd, nnz, vals,
                                 group=_group_size(both, -(-nnz // cd)))
        jd, ji = 0, 1
    else:
        dat = _chunk_tasks(dsk, name, src, "data", cd, nnz, vals,
                           group=_group_size([arrays["data"]], -(-nnz // cd)))
        ind = _chunk_tasks(dsk, name, src, "indices", ci, nnz, vals,
                           group=_group_size([arrays["indices"]], -(-nnz // ci)))
        jd = ji = 0
    idx_dtype = np.dtype(arrays["indices"].dtype).str
    for i, ((r0, r1), (lo, hi)) in enumerate(zip(rows, vals, strict=True)):
        if hi > lo:
            data = (_join, jd, lo, hi, dat[i][0], *dat[i][1])
            indices = (_join, ji, lo, hi, ind[i][0], *ind[i][1])
        else:
            data = (np.empty, 0, store.dtype.str)
            indices = (np.empty, 0, idx_dtype)
        ps, pk = ptr[i]
        dsk[(name, i, 0)] = (_csr_block, m, r0, r1, ps, pk, data, indices, store.path, ci)
