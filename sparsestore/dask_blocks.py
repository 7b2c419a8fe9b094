"""scipy CSR/CSC matrices that answer numpy's calls: the chunk type of :mod:`sparsestore.dask`.

dask's reductions call ``np.sum(chunk, axis=..., keepdims=True)``, ``np.max``,
``np.matmul``... on chunks, and scipy matrices accept none of numpy's keywords
(dask/dask#4664); :class:`CSRBlock`/:class:`CSCBlock` answer with numpy semantics when
numpy's keywords are given and behave like scipy matrices otherwise.  Importing this module
registers them with dask's ``concatenate``/``numel`` dispatch.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import scipy.sparse as sp
from dask.array.dispatch import concatenate_lookup, nannumel_lookup, numel_lookup

__all__ = ["CSCBlock", "CSRBlock", "as_blocks"]

_UNSET: Any = object()  # numpy passes keepdims=... only when its caller did

# Ufuncs that map 0 to 0; scipy implements each as a method of the same name.
_ZERO_PRESERVING = frozenset(
    ["arcsin", "arcsinh", "arctan", "arctanh", "ceil", "deg2rad", "expm1", "floor", "log1p"]
    + ["rad2deg", "rint", "sign", "sin", "sinh", "sqrt", "tan", "tanh", "trunc"]
)
# What numpy did before it learned about our __array_ufunc__: defer to scipy's
# reflected operator (``ndarray @ block`` -> ``block.__rmatmul__(ndarray)``).
_REFLECTED = {
    np.add: "__radd__",
    np.subtract: "__rsub__",
    np.multiply: "__rmul__",
    np.true_divide: "__rtruediv__",
    np.matmul: "__rmatmul__",
    np.equal: "__eq__",
    np.not_equal: "__ne__",
    np.less: "__gt__",
    np.greater: "__lt__",
    np.less_equal: "__ge__",
    np.greater_equal: "__le__",
}


def _axes(axis: Any) -> frozenset[int]:
    if axis is None:
        return frozenset((0, 1))
    axs = axis if isinstance(axis, (tuple, list)) else (axis,)
    out = set()
    for a in axs:
        a = int(a)
        if not -2 <= a <= 1:
            raise np.exceptions.AxisError(a, 2)
        out.add(a % 2)
    return frozenset(out)


def _sum_dtype(dt: np.dtype) -> np.dtype:
    """scipy's accumulator for ``sum``: integers and bools widen to the platform int."""
    if dt.kind == "u" and np.can_cast(dt, np.uint):
        return np.dtype(np.uint)
    if np.can_cast(dt, np.int_):
        return np.dtype(np.int_)
    return dt


def _dense(x: Any) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _shape_out(shape: tuple[int, int], axes: frozenset[int], keepdims: bool) -> tuple:
    if keepdims:
        return tuple(1 if i in axes else s for i, s in enumerate(shape))
    return tuple(s for i, s in enumerate(shape) if i not in axes)


def _finish(res: Any, out: Any) -> Any:
    if out is not None:
        out[...] = res
        return out
    return res[()] if isinstance(res, np.ndarray) and res.ndim == 0 else res


class _NumpyCompat:
    """numpy-style reductions, transpose and ufuncs for scipy compressed matrices.

    Without numpy's keywords (``keepdims``) every method keeps scipy's behaviour; with
    them (as ``np.sum(x, axis, keepdims=True)`` passes them) results are ndarrays shaped
    as numpy would shape them.
    """

    @property
    def size(self) -> int:  # type: ignore[override]
        """Number of elements (numpy's meaning); ``nnz`` counts stored values."""
        return int(self.shape[0]) * int(self.shape[1])

    def _np_reduce(self, op: str, axis: Any, dtype: Any, keepdims: Any) -> np.ndarray:
        axes = _axes(axis)
        base = super()
        if (
            op == "sum"
            and axes == {0 if isinstance(self, sp.csr_matrix) else 1}
            and (dtype is None or np.can_cast(self.dtype, dtype))
        ):
            res = self._minor_sum(dtype)
        elif not axes:
            res = self.toarray()
        elif len(axes) == 2:
            kw = {"dtype": dtype} if op == "sum" else {}
            res = np.asarray(getattr(base, op)(**kw))
        else:
            kw = {"dtype": dtype} if op == "sum" else {}
            res = _dense(getattr(base, op)(axis=next(iter(axes)), **kw))
        if dtype is not None and op != "sum":
            res = res.astype(dtype, copy=False)
        return res.reshape(_shape_out(self.shape, axes, bool(keepdims)))

    def _minor_sum(self, dtype: Any) -> np.ndarray:
        """Sums over the minor axis (a CSR block's columns, a CSC block's rows).

        One scatter-add of ``data`` at ``indices`` (scipy's CSC mat-vec of the values as
        a single column): no transpose, no conversion, and it never reads ``indptr``
        beyond its last entry.  ``dtype`` defaults to scipy's (ints widen, floats stay).
        """
        acc = np.dtype(dtype) if dtype is not None else _sum_dtype(self.dtype)
        nnz = int(self.indptr[-1])
        n = self.shape[1] if isinstance(self, sp.csr_matrix) else self.shape[0]
        col = sp.csc_matrix(
            (self.data[:nnz], self.indices[:nnz], np.array([0, nnz])), shape=(n, 1)
        )
        return np.asarray(col @ np.ones(1, dtype=acc)).astype(acc, copy=False)

    def sum(self, axis=None, dtype=None, out=None, keepdims=_UNSET, **kw):  # type: ignore[override]
        """scipy's ``sum``; with ``keepdims`` (numpy's call) an ndarray shaped like numpy's."""
        if keepdims is _UNSET and not kw:
            return super().sum(axis=axis, dtype=dtype, out=out)
        return _finish(self._np_reduce("sum", axis, dtype, keepdims), out)

    def mean(self, axis=None, dtype=None, out=None, keepdims=_UNSET, **kw):  # type: ignore[override]
        """scipy's ``mean``; with ``keepdims`` an ndarray shaped like numpy's."""
        if keepdims is _UNSET and not kw:
            return super().mean(axis=axis, dtype=dtype, out=out)
        axes = _axes(axis)
        count = int(np.prod([self.shape[a] for a in axes])) if axes else 1
        acc = dtype or (np.float64 if self.dtype.kind in "biu" else self.dtype)
        total = self._np_reduce("sum", axis, acc, keepdims)
        return _finish(np.true_divide(total, count, dtype=acc), out)

    def max(self, axis=None, out=None, *, explicit=False, keepdims=_UNSET, **kw):  # type: ignore[override]
        """scipy's ``max``; with ``keepdims`` an ndarray shaped like numpy's."""
        if keepdims is _UNSET and not kw:
            return super().max(axis=axis, out=out, explicit=explicit)
        return _finish(self._np_reduce("max", axis, None, keepdims), out)

    def min(self, axis=None, out=None, *, explicit=False, keepdims=_UNSET, **kw):  # type: ignore[override]
        """scipy's ``min``; with ``keepdims`` an ndarray shaped like numpy's."""
        if keepdims is _UNSET and not kw:
            return super().min(axis=axis, out=out, explicit=explicit)
        return _finish(self._np_reduce("min", axis, None, keepdims), out)

    def transpose(self, axes=None, copy=False):  # type: ignore[override]
        """The transpose as the other block type (CSR <-> CSC), sharing the buffers."""
        if axes is not None and tuple(axes) != (1, 0):
            raise ValueError("a 2-D sparse block can only be transposed with axes (1, 0)")
        return _wrap(super().transpose(copy=copy))

    @property
    def T(self):  # type: ignore[override]
        return self.transpose()

    # Adding a dense array gives a dense result: an ndarray (scipy gives np.matrix, whose
    # ``**`` is a matrix power and breaks dask's var/std).
    def __add__(self, other):
        return _wrap(super().__add__(other))

    def __radd__(self, other):
        return _wrap(super().__radd__(other))

    def __sub__(self, other):
        return _wrap(super().__sub__(other))

    def __rsub__(self, other):
        return _wrap(super().__rsub__(other))

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if method != "__call__" or kwargs.get("out") is not None:
            return NotImplemented
        kwargs.pop("out", None)
        dtype = kwargs.pop("dtype", None)
        if kwargs:
            return NotImplemented
        res = _apply_ufunc(ufunc, inputs)
        if res is NotImplemented:
            return res
        if dtype is not None and res is not None:
            res = res.astype(dtype)
        return _wrap(res)


def _apply_ufunc(ufunc: Any, inputs: tuple[Any, ...]) -> Any:
    if len(inputs) == 1:
        (x,) = inputs
        base = super(_NumpyCompat, x)
        if ufunc.__name__ in _ZERO_PRESERVING:
            return getattr(base, ufunc.__name__)()
        if ufunc is np.absolute:
            return base.__abs__()
        if ufunc is np.negative:
            return base.__neg__()
        return NotImplemented
    if len(inputs) != 2:
        return NotImplemented
    a, b = inputs
    if isinstance(a, _NumpyCompat):
        base = super(_NumpyCompat, a)
        if ufunc is np.matmul:
            return base.__matmul__(b)
        if ufunc is np.multiply:
            return base.multiply(b)
        if ufunc is np.true_divide and np.isscalar(b):
            return base.__truediv__(b)
        return NotImplemented
    name = _REFLECTED.get(ufunc)
    if name is None:
        return NotImplemented
    return getattr(super(_NumpyCompat, b), name)(a)


class CSRBlock(_NumpyCompat, sp.csr_matrix):
    """A scipy CSR matrix that dask can reduce: the chunk type of :func:`to_dask`."""


class CSCBlock(_NumpyCompat, sp.csc_matrix):
    """The transpose of a :class:`CSRBlock` (what ``darr.T`` holds)."""


def _wrap(x: Any) -> Any:
    """Give scipy CSR/CSC results our block type; np.matrix becomes ndarray."""
    if isinstance(x, _NumpyCompat):
        return x
    if sp.issparse(x):
        if x.format == "csc":
            return CSCBlock(x)
        return CSRBlock(x.tocsr() if x.format != "csr" else x)
    if isinstance(x, np.matrix):
        return np.asarray(x)
    return x


def _concatenate(blocks: list[Any], axis: int = 0) -> Any:
    if not all(sp.issparse(b) for b in blocks):
        return np.concatenate([_dense(b) for b in blocks], axis=axis)
    fmt = "csc" if isinstance(blocks[0], sp.csc_matrix) else "csr"
    if len(blocks) == 1:
        return _wrap(blocks[0])
    if axis == 0:
        return _wrap(sp.vstack(blocks, format=fmt))
    if axis == 1:
        return _wrap(sp.hstack(blocks, format=fmt))
    raise ValueError(f"sparse blocks concatenate along axis 0 or 1, not {axis}")


def _numel(x: Any, **kwargs: Any) -> Any:
    """Element counts as ndarrays (like dask's numel for ``sparse.COO``)."""
    dtype = kwargs.get("dtype") or np.float64
    keepdims = bool(kwargs.get("keepdims", False))
    axes = _axes(kwargs.get("axis"))
    count = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    if not keepdims and len(axes) == 2:
        return np.prod(x.shape, dtype=dtype)
    return np.full(_shape_out(x.shape, axes, keepdims), count, dtype=dtype)


concatenate_lookup.register((CSRBlock, CSCBlock), _concatenate)
numel_lookup.register((CSRBlock, CSCBlock), _numel)
nannumel_lookup.register((CSRBlock, CSCBlock), _numel)


def as_blocks(darr: da.Array) -> da.Array:
    """Make a dask array of plain scipy sparse chunks reducible (chunks become CSRBlock)."""
    meta = CSRBlock((0, 0), dtype=darr.dtype)
    return darr.map_blocks(_wrap, dtype=darr.dtype, meta=meta)
