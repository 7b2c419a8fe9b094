"""Validate raw CSR parts and bring them to canonical form.

Canonical means: indices sorted within each row, duplicates summed, explicit zeros dropped
(unless asked to keep them), ``indptr`` int64 and ``indices`` in the store's index dtype.
Every writer goes through :func:`canonical_block`, so every store is canonical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from .errors import DTypeError, InvalidInputError, ShapeMismatchError, UnsafeInputError
from .layout import check_dim, check_value_dtype, index_dtype

# scipy's compiled kernels do not cover float16; canonicalise in float32 and cast back.
_SCIPY_UPCAST = {np.dtype(np.float16): np.dtype(np.float32)}

# What to do with NaN and infinite values: refuse them (the default) or store them.
NAN_POLICIES = ("raise", "keep")

# A store's indptr takes 8 bytes a row and is written in full, so a declared row count must
# be backed by data: at most ROW_ALLOWANCE rows, plus ROWS_PER_ENTRY rows per stored entry.
ROW_ALLOWANCE = 2**31
ROWS_PER_ENTRY = 2**10


# How values are cast to the store's dtype (see :func:`cast_values`).
CASTINGS = ("safe", "same_value", "unsafe")


def check_casting(casting: Any) -> str:
    """Validate a ``casting`` option (one of :data:`CASTINGS`)."""
    if not isinstance(casting, str) or casting not in CASTINGS:
        raise InvalidInputError(
            f"casting must be 'same_value' (refuse values the dtype cannot hold), 'safe' "
            f"(refuse a dtype that could lose values) or 'unsafe' (store what numpy's astype "
            f"makes), got {casting!r}"
        )
    return casting


def native(a: np.ndarray) -> np.ndarray:
    """``a`` in native byte order (the same values; a copy only when it was swapped)."""
    dt = a.dtype
    return a.astype(dt.newbyteorder("=")) if dt.byteorder not in ("=", "|") else a


def cast_values(
    values: np.ndarray, dtype: Any, *, casting: str = "same_value",
    where: Callable[[int], str] | None = None,
) -> np.ndarray:
    """``values`` as ``dtype``, refusing a cast that would change what is stored.

    The one cast check of every write path.  ``casting``:

    * ``"same_value"``: a value is refused when the cast changes it: an integer or bool
      target must hold it exactly (no overflow, no fraction, no NaN); a float target may
      round it to the nearest representable value (what asking for a narrower float
      means), but a finite value must not overflow to inf, nor a nonzero one underflow to
      zero (its entry would vanish).
    * ``"safe"``: refuse (:class:`DTypeError`) a source dtype that could lose any value,
      as numpy's ``can_cast(..., "safe")`` (float64 into float32 included), whatever the
      values.
    * ``"unsafe"``: numpy's ``astype``; the caller drops any zero it creates.

    ``where(k)`` names the ``k``-th value (its row and column) in the message.
    """
    dst = np.dtype(dtype)
    src = values.dtype
    if src == dst:
        return values
    if np.can_cast(src, dst, casting="safe"):
        return values.astype(dst)
    if casting == "safe":
        raise DTypeError(
            f"{src} values may not fit a {dst} store; cast them yourself, or pass "
            "casting='same_value' to store them when every value fits"
        )
    with np.errstate(all="ignore"):
        out = values.astype(dst)
        if casting == "unsafe" or values.size == 0:
            return out
        if dst.kind == "f":
            bad = (np.isfinite(values) & ~np.isfinite(out)) | ((out == 0) & (values != 0))
        else:  # the value back must be the same, with the same sign (uint64 <-> int64)
            bad = (out.astype(src) != values) | ((out < 0) != (values < 0))
    if not bad.any():
        return out
    k = int(np.argmax(bad))  # a flat index for a 2-D block
    at = where(k) if where is not None else f"value {k}"
    raise InvalidInputError(
        f"{at} holds {values.flat[k].item()!r}, which {dst} cannot hold (it would become "
        f"{out.flat[k].item()!r}); "
        f"pass a dtype that holds the values (e.g. dtype=np.{src.name}), or "
        f"casting='unsafe' to store what {src}.astype({dst}) makes"
    )


def native_matrix(X: Any) -> Any:
    """A scipy sparse matrix with its arrays in native byte order (scipy's kernels refuse
    big-endian ones); the same object when they already are."""
    fmt = getattr(X, "format", None)
    names = {"csr": ("data", "indices", "indptr"), "csc": ("data", "indices", "indptr"),
             "bsr": ("data", "indices", "indptr"), "coo": ("data", "row", "col"),
             "dia": ("data", "offsets")}.get(fmt, ())
    parts = [np.asarray(getattr(X, n)) for n in names]
    if all(p.dtype.isnative for p in parts):
        return X
    parts = [native(p) for p in parts]  # scipy's own copy() cannot copy swapped arrays
    arg = (parts[0], (parts[1], parts[2])) if fmt == "coo" else tuple(parts)
    return type(X)(arg, shape=X.shape, copy=False)


def _as_int_array(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise InvalidInputError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise InvalidInputError(f"{name} contains NaN or inf; it must hold integers")
        if not np.array_equal(arr, np.floor(arr)):
            raise InvalidInputError(f"{name} contains non-integer values")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind == "b" or arr.dtype.kind not in "iu":
        raise InvalidInputError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr


def check_nan_policy(nan_policy: Any) -> str:
    """Validate a ``nan_policy`` option: ``"raise"`` refuses NaN/inf values, ``"keep"``
    stores them."""
    if not isinstance(nan_policy, str) or nan_policy not in NAN_POLICIES:
        raise InvalidInputError(
            f"nan_policy must be 'raise' (refuse NaN and infinite values) or 'keep' (store "
            f"them), got {nan_policy!r}"
        )
    return nan_policy


def check_finite(
    data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, *, first_row: int | None = None
) -> None:
    """Refuse NaN and infinite floating values, naming the first one's row and column.

    One sum is the test (NaN and inf survive it); the element-wise test only runs when the
    sum is not finite, which finite values alone rarely make (by overflowing it).
    ``first_row``: the block's first row in the matrix, for the message.
    """
    if data.dtype.kind != "f" or data.size == 0:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(data)):
            return
    bad = ~np.isfinite(data)
    if not bad.any():
        return
    k = int(np.argmax(bad))
    row = int(np.searchsorted(indptr, k, side="right")) - 1
    where = f"row {first_row + row}" if first_row is not None else f"row {row} of the block"
    raise InvalidInputError(
        f"{where}, column {int(indices[k])} holds {data[k]} (as {data.dtype}): NaN and "
        "infinite values are refused; clean the data, or pass nan_policy='keep' to store them"
    )


def check_row_count(n_rows: int, nnz: int, what: str) -> None:
    """Refuse a declared row count that the stored entries cannot back.

    Every row costs 8 bytes of ``indptr``, written in full, so a header declaring 10**12
    rows for one entry would mean 8 TB of pointers: more than ``ROW_ALLOWANCE`` rows plus
    ``ROWS_PER_ENTRY`` rows per entry raises :class:`UnsafeInputError`, before anything of
    that size is allocated.
    """
    limit = ROW_ALLOWANCE + ROWS_PER_ENTRY * max(0, int(nnz))
    if n_rows > limit:
        raise UnsafeInputError(
            f"{what} declares {n_rows} rows for {nnz} stored entries: its indptr alone (8 bytes "
            f"a row) would take {8 * (n_rows + 1) / 2**30:.3g} GiB; refusing more than "
            f"{ROW_ALLOWANCE} rows plus {ROWS_PER_ENTRY} per entry ({limit} here). Check the "
            "declared row count, "
            "or store only the rows that hold entries, with their row ids as a label"
        )


def check_parts(
    data: Any, indices: Any, indptr: Any, n_cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check CSR parts for structural validity; return them as numpy arrays.

    Raises :class:`InvalidInputError` naming the first fault found.
    """
    n_cols = check_dim(n_cols, "n_cols")
    indptr = _as_int_array(indptr, "indptr")
    indices = _as_int_array(indices, "indices")
    data = np.asarray(data)
    if data.ndim != 1:
        raise InvalidInputError(f"data must be 1-D, got shape {data.shape}")
    check_value_dtype(data.dtype)
    if indptr.size == 0:
        raise InvalidInputError("indptr is empty; it needs n_rows + 1 entries starting at 0")
    if indptr[0] != 0:
        raise InvalidInputError(f"indptr must start at 0, starts at {indptr[0]}")
    if indptr.size > 1 and np.any(np.diff(indptr) < 0):
        bad = int(np.flatnonzero(np.diff(indptr) < 0)[0])
        raise InvalidInputError(
            f"indptr is not monotone: indptr[{bad + 1}]={indptr[bad + 1]} < "
            f"indptr[{bad}]={indptr[bad]}"
        )
    if int(indptr[-1]) != indices.size or indices.size != data.size:
        raise InvalidInputError(
            f"indptr[-1]={int(indptr[-1])}, len(indices)={indices.size} and "
            f"len(data)={data.size} must all be equal"
        )
    if indices.size:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0:
            raise InvalidInputError(f"column index {lo} is negative")
        if hi >= n_cols:
            raise InvalidInputError(
                f"column index {hi} is out of range for a matrix with {n_cols} columns"
            )
    return data, indices, indptr


def _is_canonical(
    data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_cols: int, keep_zeros: bool
) -> bool:
    """Whether checked CSR parts are already canonical (sorted unique column ids in every
    row) and, unless ``keep_zeros``, hold no explicit zeros: scipy's one-pass check, on a
    matrix that shares the caller's arrays and is only read."""
    if not keep_zeros and np.count_nonzero(data) != data.size:
        return False
    m = sp.csr_matrix((data, indices, indptr), shape=(indptr.size - 1, n_cols), copy=False)
    return bool(m.has_canonical_format)


def canonical_parts(
    data: np.ndarray,
    indices: np.ndarray,
    indptr: np.ndarray,
    n_cols: int,
    *,
    keep_zeros: bool = False,
    dtype: np.dtype | None = None,
    copy: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonicalise checked CSR parts; never mutates the caller's arrays when ``copy``."""
    out_dtype = np.dtype(dtype) if dtype is not None else data.dtype
    work_dtype = _SCIPY_UPCAST.get(out_dtype, out_dtype)
    n_rows = indptr.size - 1
    if work_dtype == out_dtype and _is_canonical(data, indices, indptr, n_cols, keep_zeros):
        # Nothing to change (the common case: scipy's own output): no copies.  The
        # writer only reads these, then copies or encodes them into its chunks.
        return (data.astype(out_dtype, copy=False),
                indices.astype(index_dtype(n_cols), copy=False),
                indptr.astype(np.int64, copy=False))
    # scipy works in place on its arrays: hand it copies so user input stays untouched.
    m = sp.csr_matrix(
        (
            data.astype(work_dtype, copy=copy),
            indices.astype(np.int64 if indices.dtype.itemsize > 4 else np.int32, copy=copy),
            indptr.astype(np.int64, copy=copy),
        ),
        shape=(n_rows, n_cols),
    )
    if not m.has_canonical_format:
        m.sum_duplicates()
    if not keep_zeros:
        m.eliminate_zeros()
    ind = m.indices.astype(index_dtype(n_cols), copy=False)
    ptr = m.indptr.astype(np.int64, copy=False)
    vals = m.data.astype(out_dtype, copy=False)
    return vals, ind, ptr


def check_sparse_input(X: Any) -> None:
    """Validate a scipy sparse matrix's raw structure before any scipy code touches it.

    scipy trusts its attributes (``indptr``, ``indices``, ``row``...), which a caller can set
    to anything; slicing a malformed matrix fails deep inside scipy, or worse.
    """
    if not sp.issparse(X):
        return
    if X.ndim != 2:
        raise InvalidInputError(f"expected a 2-D matrix, got {X.ndim}-D")
    n_rows, n_cols = check_dim(X.shape[0], "n_rows"), check_dim(X.shape[1], "n_cols")
    fmt = X.format
    try:
        if fmt in ("csr", "csc"):
            major, minor = (n_rows, n_cols) if fmt == "csr" else (n_cols, n_rows)
            for name in ("indices", "indptr"):
                arr = np.asarray(getattr(X, name))
                if arr.dtype.kind not in "iu":
                    raise InvalidInputError(
                        f"{fmt} {name} must be an integer array, got dtype {arr.dtype}"
                    )
            indptr = check_parts(X.data, X.indices, X.indptr, minor)[2]
            if indptr.size != major + 1:
                raise InvalidInputError(
                    f"{fmt} indptr has {indptr.size} entries; a {X.shape[0]}x{X.shape[1]} "
                    f"matrix needs {major + 1}"
                )
        elif fmt == "coo":
            data = np.asarray(X.data)
            if data.ndim != 1:
                raise InvalidInputError(f"coo data must be 1-D, got shape {data.shape}")
            check_value_dtype(data.dtype)
            for name, arr, size in (("row", X.row, n_rows), ("col", X.col, n_cols)):
                arr = np.asarray(arr)
                if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.size != data.size:
                    raise InvalidInputError(
                        f"coo {name} must be a 1-D integer array as long as data "
                        f"({data.size}), got {arr.dtype} of shape {arr.shape}"
                    )
                if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= size):
                    raise InvalidInputError(
                        f"coo {name} index out of range: must be in [0, {size})"
                    )
        else:
            check_value_dtype(X.dtype)
            if fmt == "bsr":
                X.check_format(full_check=True)
    except (ValueError, TypeError, IndexError, OverflowError) as exc:
        if isinstance(exc, InvalidInputError | DTypeError):
            raise
        raise InvalidInputError(f"malformed {fmt} matrix: {exc}") from None


def to_csr(X: Any) -> sp.csr_matrix:
    """Any 2-D scipy sparse or array-like as a scipy CSR (no canonicalisation)."""
    if sp.issparse(X):
        if X.ndim != 2:
            raise InvalidInputError(f"expected a 2-D matrix, got {X.ndim}-D")
        return X.tocsr() if X.format != "csr" else X
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise InvalidInputError(f"expected a 2-D matrix, got an array of shape {arr.shape}")
    check_value_dtype(arr.dtype)
    return sp.csr_matrix(arr)


def canonical_block(
    X: Any,
    n_cols: int | None = None,
    *,
    keep_zeros: bool = False,
    dtype: np.dtype | None = None,
    nan_policy: str = "raise",
    first_row: int | None = None,
    casting: str = "same_value",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn one row block (scipy sparse, dense array, any byte order) into canonical CSR
    parts.

    ``nan_policy="raise"`` refuses NaN and infinite values (as stored, so also those a cast
    to ``dtype`` or a sum of duplicates makes), naming the first one's row (``first_row``:
    the block's first row in the matrix) and column; ``"keep"`` stores them.  Values are
    cast to ``dtype`` by :func:`cast_values` (``casting``) before the zeros are dropped, so
    a zero the cast makes is dropped too.
    """
    check_nan_policy(nan_policy)
    check_casting(casting)
    if sp.issparse(X):
        X = native_matrix(X)
    else:
        arr = native(np.asarray(X))
        if arr.ndim != 2:
            raise InvalidInputError(f"expected a 2-D matrix, got an array of shape {arr.shape}")
        if arr.dtype.kind not in "biuf":
            raise DTypeError(
                f"dtype {arr.dtype} cannot be stored: only bool, integer and floating point "
                "values are supported"
            )
        if arr.dtype in _SCIPY_UPCAST:  # scipy cannot even build a float16 matrix (exact)
            arr = arr.astype(_SCIPY_UPCAST[arr.dtype])
        X = arr
    m = to_csr(X)
    if n_cols is not None and m.shape[1] != n_cols:
        raise ShapeMismatchError(
            f"block has {m.shape[1]} columns but the store has {n_cols}; every block must "
            "have the same number of columns"
        )
    data, indices, indptr = check_parts(m.data, m.indices, m.indptr, m.shape[1])
    if nan_policy == "raise" and data.dtype.kind == "f" and np.dtype(
        dtype if dtype is not None else data.dtype
    ).kind != "f":
        check_finite(data, indices, indptr, first_row=first_row)  # a cast would hide it
    if dtype is not None and np.dtype(dtype) != data.dtype:

        def where(k: int) -> str:
            row = int(np.searchsorted(indptr, k, side="right")) - 1
            at = f"row {first_row + row}" if first_row is not None else f"row {row} of the block"
            return f"{at}, column {int(indices[k])}"

        data = cast_values(data, dtype, casting=casting, where=where)
    vals, ind, ptr = canonical_parts(
        data, indices, indptr, m.shape[1], keep_zeros=keep_zeros, dtype=dtype
    )
    if nan_policy == "raise":
        check_finite(vals, ind, ptr, first_row=first_row)
    return vals, ind, ptr
