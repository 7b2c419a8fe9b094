"""Check a store end to end: metadata, structure and every chunk's CRC32C.

:func:`validate_store` never raises for a fault it finds; it collects them in a
:class:`ValidationReport`.  It raises only when the path holds no store at all.  The deep
pass streams the arrays chunk by chunk (each chunk decoded once), so memory stays bounded
by a few chunks however large the store is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import storage
from .blocks import entry_bounds
from .checks import check_chunk_size
from .chunk_cache import ChunkCache
from .chunks import read_slice
from .errors import CorruptStoreError, NotAStoreError, SparseStoreError
from .layout import LABELS_GROUP, MAX_DIM, META_KEY, check_codecs, check_value_dtype
from .store import SparseStore, open_group

# Row blocks of the deep pass span at most this many data chunks (bounded memory).
_BLOCK_CHUNKS = 4
_MAX_PROBLEMS = 200


@dataclass
class ValidationReport:
    """Outcome of :func:`validate_store`: ``ok`` is True when ``problems`` is empty."""

    path: str
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    checked_chunks: int = 0
    damaged_chunks: list[str] = field(default_factory=list)
    deep: bool = True
    shape: tuple[int, int] | None = None
    nnz: int | None = None
    format: str | None = None
    # What could not be checked (not a failure): e.g. a store without a chunk manifest.
    notes: list[str] = field(default_factory=list)

    def add(self, problem: str) -> None:
        self.ok = False
        if problem in self.problems:
            return
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(problem)
        elif len(self.problems) == _MAX_PROBLEMS:
            self.problems.append("... more problems not listed")

    def __bool__(self) -> bool:
        return self.ok

    def summary(self) -> str:
        """One line for OK, else a header and one line per problem."""
        head = (
            f"{self.path}: {'OK' if self.ok else 'FAILED'} ({self.checked_chunks} chunks "
            f"checked{', deep' if self.deep else ', metadata only'})"
        )
        return "\n".join([head, *(f"  - {p}" for p in self.problems),
                          *(f"  note: {n}" for n in self.notes)])

    def raise_if_failed(self) -> None:
        """Raise :class:`CorruptStoreError` listing the problems, if any."""
        if not self.ok:
            raise CorruptStoreError(self.summary())


class _Progress:
    def __init__(self, progress: Any, total: int) -> None:
        self._bar = None
        self._own = False
        if progress is True:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="validate", unit="chunks", disable=None)
            self._own = True
        elif progress not in (None, False) and hasattr(progress, "update"):
            self._bar = progress

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._own and self._bar is not None:
            self._bar.close()


class _Chunks:
    """A :class:`~sparsestore.chunk_cache.ChunkCache` that records a damaged chunk (once) and
    answers None for it instead of raising, and counts each chunk checked once."""

    def __init__(self, arr: Any, name: str, report: ValidationReport, bar: _Progress) -> None:
        self.arr, self.name, self.report, self.bar = arr, name, report, bar
        self.cache = ChunkCache(arr, capacity=3, name=name)
        self.chunk = self.cache.chunk
        self.bad: set[int] = set()
        self.seen: set[int] = set()

    def get(self, k: int) -> np.ndarray | None:
        """Chunk ``k``'s elements, or None when it is damaged (reported the first time)."""
        if k in self.bad:
            return None
        try:
            out = self.cache.get(k, self.arr.shape[0])
        except SparseStoreError as exc:
            self.bad.add(k)
            self.report.damaged_chunks.append(f"{self.name}/{k}")
            self.report.add(str(exc))
            return None
        except Exception as exc:  # undecodable bytes: report, never raise
            self.bad.add(k)
            self.report.damaged_chunks.append(f"{self.name}/{k}")
            self.report.add(
                f"chunk {k} of {self.name!r} cannot be decoded ({type(exc).__name__}: {exc})"
            )
            return None
        if k not in self.seen:
            self.seen.add(k)
            self.report.checked_chunks += 1
            self.bar.update()
        return out

    def read(self, start: int, stop: int) -> np.ndarray | None:
        """Elements ``[start, stop)``, or None when a chunk in the range is damaged."""
        if stop <= start:
            return np.empty(0, dtype=self.arr.dtype)
        c = self.chunk
        parts = []
        for k in range(start // c, (stop - 1) // c + 1):
            buf = self.get(k)
            if buf is None:
                return None
            lo = max(start - k * c, 0)
            hi = min(stop - k * c, buf.shape[0])
            parts.append(buf[lo:hi])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def sweep(self, stop: int) -> None:
        """Decode every chunk holding elements below ``stop`` not decoded yet (CRC check)."""
        if stop <= 0:
            return
        for k in range(0, (stop - 1) // self.chunk + 1):
            if k not in self.seen and k not in self.bad:
                self.get(k)


def _n_chunks(arr: Any, stop: int) -> int:
    return 0 if stop <= 0 else (stop - 1) // int(arr.chunks[0]) + 1


def validate_store(
    store_or_path: Any,
    *,
    deep: bool = True,
    progress: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> ValidationReport:
    """Check a store's metadata, structure and (``deep``) every chunk; report, never raise.

    Cheap checks (attrs, array lengths, ``indptr[0]``, ``indptr[n]``) always run.  The deep
    pass decodes every committed chunk of every array once (CRC32C), and checks that
    ``indptr`` is monotone and that column indices are in range and strictly increasing
    within each row.  Raises :class:`StoreNotFoundError` / :class:`NotAStoreError` only
    when there is no store to check.
    """
    if isinstance(store_or_path, SparseStore):
        path = store_or_path.path
        storage_options = storage_options or store_or_path.storage_options
    else:
        path = storage.normalize(store_or_path)
    group = open_group(path, "r", storage_options)
    report = ValidationReport(path=path, deep=deep)

    attrs = dict(group.attrs)
    if attrs.get("encoding-type") == "anndata" and "X" in group:
        group = group["X"]
        attrs = dict(group.attrs)
    enc = attrs.get("encoding-type")
    is_ours = META_KEY in attrs

    # The store's own open-time checks (metadata types, shape, lengths, indptr ends).
    try:
        st = SparseStore(group, path=path, mode="r", storage_options=storage_options)
    except NotAStoreError as exc:
        if enc is None and not is_ours:
            raise
        report.add(str(exc))
        return report
    except SparseStoreError as exc:
        report.add(str(exc))
        st = None
    except Exception as exc:  # anything unforeseen in damaged metadata is a finding
        report.add(f"store cannot be opened: {type(exc).__name__}: {exc}")
        st = None
    if st is None:
        _raw_checks(group, attrs, report, deep=deep)
        return report
    report.shape, report.nnz, report.format = st.shape, st.nnz, st.format
    if not st.verified:
        report.notes.append(
            "no chunk manifest (written by an older sparsestore, or by anndata): a missing, "
            "moved or replaced chunk cannot be told from a valid one; run `sparsestore "
            f"upgrade {path}` to add one"
        )
    if not st.meta.complete:
        report.add("the store is incomplete: its save was interrupted; delete it and save again")
    if enc == "csr_matrix" and attrs.get("encoding-version") != "0.1.0":
        report.add(f"encoding-version is {attrs.get('encoding-version')!r}, expected '0.1.0'")

    labels = {name: lab.array for name, lab in st.labels.items()}
    if not deep:
        return report

    n = st.n_rows
    total = sum(_n_chunks(a, n) for a in labels.values())
    if st.is_dense:
        total += _n_chunks(st.arrays["X"], n)
    else:
        total += _n_chunks(st.arrays["indptr"], n + 1)
        total += _n_chunks(st.arrays["data"], st.nnz) + _n_chunks(st.arrays["indices"], st.nnz)
    bar = _Progress(progress, total)
    try:
        if st.is_dense:
            _sweep_rows(st.arrays["X"], "X", n, report, bar)
        else:
            _deep_csr(st, report, bar)
        for name, arr in labels.items():
            _sweep_rows(arr, f"labels/{name}", n, report, bar)
    finally:
        bar.close()
    return report


def _sweep_rows(arr: Any, name: str, n_rows: int, report: ValidationReport, bar: _Progress) -> None:
    """Decode every row chunk of an n-D array below ``n_rows`` (CRC check)."""
    c = int(arr.chunks[0])
    for lo in range(0, n_rows, c):
        hi = min(lo + c, n_rows)
        try:
            read_slice(arr, lo, hi, name=name)
        except SparseStoreError as exc:
            report.damaged_chunks.append(f"{name}/{lo // c}")
            report.add(str(exc))
            continue
        except Exception as exc:
            report.damaged_chunks.append(f"{name}/{lo // c}")
            report.add(f"rows {lo}:{hi} of {name!r} cannot be decoded ({type(exc).__name__})")
            continue
        report.checked_chunks += 1
        bar.update()


def _indptr_blocks(ptr_chunks: _Chunks, n_rows: int) -> Iterator[tuple[int, np.ndarray | None]]:
    """``(first_row, indptr[first_row : last_row + 1])`` per indptr chunk, overlapping by one."""
    c = ptr_chunks.chunk
    carry: np.ndarray | None = None
    for k in range(0, n_rows // c + 1):
        lo, hi = k * c, min((k + 1) * c, n_rows + 1)
        if lo >= hi:
            break
        vals = ptr_chunks.get(k)
        if vals is None:
            carry = None
            yield lo, None
            continue
        vals = vals[: hi - lo].astype(np.int64, copy=False)
        if carry is not None:
            yield lo - 1, np.concatenate([carry, vals])
        else:
            yield lo, vals
        carry = vals[-1:]


def _deep_csr(st: Any, report: ValidationReport, bar: _Progress) -> None:
    n, m, nnz = st.n_rows, st.n_cols, st.nnz
    arrs = st.arrays
    ptr_c = _Chunks(arrs["indptr"], "indptr", report, bar)
    data_c = _Chunks(arrs["data"], "data", report, bar)
    ind_c = _Chunks(arrs["indices"], "indices", report, bar)
    keep_zeros = st.meta.keep_zeros or META_KEY not in dict(st.group.attrs)
    reported = {"order": 0, "range": 0, "zero": 0}
    block = _BLOCK_CHUNKS * max(data_c.chunk, ind_c.chunk)

    def note(kind: str, msg: str) -> None:
        reported[kind] += 1
        if reported[kind] <= 5:
            report.add(msg)

    for r0, ptr in _indptr_blocks(ptr_c, n):
        if ptr is None or ptr.size < 2:
            continue
        d = np.diff(ptr)
        if (d < 0).any():
            i = int(np.flatnonzero(d < 0)[0])
            report.add(
                f"indptr is not monotone: indptr[{r0 + i + 1}]={int(ptr[i + 1])} < "
                f"indptr[{r0 + i}]={int(ptr[i])}"
            )
            continue
        if ptr[-1] > nnz or ptr[0] < 0:
            report.add(f"indptr values in rows {r0}:{r0 + ptr.size - 1} exceed nnz={nnz}")
            continue
        # Cut the rows of this indptr chunk into blocks of bounded nnz.
        bounds = entry_bounds(ptr, block)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            local = ptr[a : b + 1]
            lo, hi = int(local[0]), int(local[-1])
            ind = ind_c.read(lo, hi)
            vals = data_c.read(lo, hi)
            if ind is None:
                continue
            if ind.size:
                bad = (ind < 0) | (ind >= m)
                if bad.any():
                    j = int(np.flatnonzero(bad)[0])
                    row = r0 + a + int(np.searchsorted(local, lo + j, side="right")) - 1
                    note("range", f"row {row}: column index {int(ind[j])} is outside [0, {m})")
                step = np.diff(ind.astype(np.int64))
                starts = (local[1:-1] - lo).astype(np.int64)
                ok = np.ones(step.size, dtype=bool)
                ok[starts[(starts > 0) & (starts <= step.size)] - 1] = False  # row boundaries
                wrong = (step <= 0) & ok
                if wrong.any():
                    j = int(np.flatnonzero(wrong)[0]) + 1
                    row = r0 + a + int(np.searchsorted(local, lo + j, side="right")) - 1
                    note(
                        "order",
                        f"row {row}: column indices are not strictly increasing (unsorted or "
                        "duplicated entries)",
                    )
            if vals is not None and not keep_zeros and vals.size and not vals.all():
                j = int(np.flatnonzero(vals == 0)[0])
                note(
                    "zero",
                    f"data[{lo + j}] is an explicit zero in a store written without "
                    f"keep_zeros: chunk {(lo + j) // data_c.chunk} of 'data' is missing or "
                    "was overwritten",
                )
    # Chunks no row reached (e.g. after a damaged indptr chunk) still get their CRC checked.
    ptr_c.sweep(n + 1)
    data_c.sweep(nnz)
    ind_c.sweep(nnz)


def _raw_checks(
    group: Any, attrs: dict[str, Any], report: ValidationReport, *, deep: bool
) -> None:
    """Best-effort findings when the store cannot even be opened (and, deep, every CRC).

    Only arrays with a storable dtype and safe codecs are decoded: a hostile store never
    gets to run a codec of its choosing.
    """
    shape = attrs.get("shape")
    if not (
        isinstance(shape, (list, tuple))
        and len(shape) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM
                for s in shape)
    ):
        report.add(f"attrs['shape'] is not [n_rows, n_cols] of sane integers: {shape!r:.80}")
    candidates: list[tuple[str, Any]] = []
    for name in ("data", "indices", "indptr", "X"):
        try:
            if name in group:
                candidates.append((name, group[name]))
            elif attrs.get("encoding-type") == "csr_matrix" and name != "X":
                report.add(f"array {name!r} is missing")
        except Exception as exc:
            report.add(f"array {name!r} cannot be opened ({type(exc).__name__}: {exc})")
    try:
        if LABELS_GROUP in group and hasattr(group[LABELS_GROUP], "arrays"):
            candidates += [(f"labels/{k}", a) for k, a in group[LABELS_GROUP].arrays()]
    except Exception as exc:
        report.add(f"labels cannot be opened ({type(exc).__name__}: {exc})")
    safe = []
    for name, arr in candidates:
        try:
            if not hasattr(arr, "chunks") or arr.ndim < 1:
                report.add(f"{name!r} is not an array")
                continue
            check_value_dtype(arr.dtype)
            check_codecs(arr, name, report.path)
            check_chunk_size(arr, name, report.path)
        except SparseStoreError as exc:
            report.add(f"array {name!r}: {exc}")
            continue
        safe.append((name, arr))
    if not deep:
        return
    bar = _Progress(None, 0)
    for name, arr in safe:
        _sweep_rows(arr, name, int(arr.shape[0]), report, bar)


__all__ = ["ValidationReport", "validate_store"]
