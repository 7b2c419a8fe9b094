"""How a loader's batches cross into TensorFlow, for :mod:`sparsestore.adapters.tensorflow`.

:class:`_Plan` fixes one loader's wire format: the exact signature of each
``tf.numpy_function`` hand-off (host COO coordinates, compact CSR parts or dense rows, then
labels; small host COO batches bundled up to ``MAX_BUNDLE`` at a time), the numpy side that
writes those parts, and the TensorFlow ops that turn them into the ``SparseTensor`` (or dense
``Tensor``) element.  Also the dtype, ``sample_shape`` and ``expand`` checks, and the pool of
host buffers the COO parts are written into.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from sparsestore.batch import Batch
from sparsestore.buffers import BufferPool
from sparsestore.errors import DTypeError, InvalidInputError, ShapeMismatchError
from sparsestore.kernels import coo_into
from sparsestore.loader import DataLoader

HOST_IDLE_BATCHES = 8  # idle host COO memory the dataset keeps, in average batches
BUNDLE_NNZ = 1 << 16  # small host COO batches cross together, up to about this many values
MAX_BUNDLE = 32  # batches per hand-off at most (each is read ahead of TensorFlow)


def _tf_dtype(dtype: Any, what: str) -> tf.DType:
    dtype = np.dtype(dtype)
    if dtype.kind in "US":
        return tf.string
    try:
        if dtype.kind == "O":
            raise TypeError("object")
        return tf.as_dtype(dtype)
    except TypeError:
        raise DTypeError(
            f"{what} has dtype {dtype}, which TensorFlow cannot hold; store it as a numeric "
            "dtype (e.g. float32, int64)"
        ) from None


def _check_sample_shape(sample_shape: Any, n_cols: int) -> tuple[int, ...] | None:
    if sample_shape is None:
        return None
    try:
        dims = tuple(int(d) for d in sample_shape)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"sample_shape must be a tuple of positive ints such as (28, 28), got "
            f"{sample_shape!r}"
        ) from None
    if not dims or any(d < 1 for d in dims):
        raise InvalidInputError(f"sample_shape must hold positive ints, got {sample_shape!r}")
    if int(np.prod(dims)) != n_cols:
        raise ShapeMismatchError(
            f"sample_shape {dims} holds {int(np.prod(dims))} values per row but the loader's "
            f"rows have {n_cols} columns; choose dims whose product is {n_cols}"
        )
    return dims


def _check_expand(expand: Any) -> str:
    if expand not in ("host", "graph"):
        raise InvalidInputError(
            f"expand must be 'host' (numpy writes the COO coordinates; fastest on CPU) or "
            f"'graph' (compact CSR parts, TensorFlow ops expand them), got {expand!r}"
        )
    return str(expand)


@dataclass(frozen=True)
class _Plan:
    """How one loader's batches cross into TensorFlow: the wire signature and the expansion."""

    n_cols: int
    dense: bool
    values_dtype: tf.DType
    index_dtype: np.dtype  # int32 when every column id fits, else int64
    label_specs: tuple[tf.TensorSpec, ...]
    sample_shape: tuple[int, ...] | None
    expand_on: str = "host"  # "host": numpy writes COO coordinates; "graph": TF ops do
    buffers: BufferPool | None = None
    bundle: int = 1  # batches per numpy_function hand-off (host COO only)

    @property
    def tail(self) -> tuple[int, ...]:
        """The per-row shape of the batches: ``(n_cols,)`` or ``sample_shape``."""
        return self.sample_shape or (self.n_cols,)

    @classmethod
    def for_loader(cls, loader: Any, sample_shape: Any = None, expand: str = "host") -> _Plan:
        if not isinstance(loader, DataLoader):
            raise InvalidInputError(
                f"expected a sparsestore.DataLoader, got {type(loader).__name__}; build one "
                "with sparsestore.DataLoader(store, batch_size=...)"
            )
        n_cols = int(loader.n_cols)
        dense = bool(loader.is_dense)
        index_dtype = np.dtype(np.int32 if n_cols <= np.iinfo(np.int32).max else np.int64)
        if not dense:
            stored = np.dtype(loader.store.arrays["indices"].dtype)
            if not np.can_cast(stored, np.int32):
                index_dtype = np.dtype(np.int64)
        labels = tuple(
            tf.TensorSpec(shape=(None, *tail), dtype=_tf_dtype(dt, f"label {name!r}"), name=name)
            for name, dt, tail in loader.label_specs
        )
        dims = _check_sample_shape(sample_shape, n_cols)
        host_coo = expand == "host" and not dense
        return cls(
            n_cols=n_cols,
            dense=dense,
            values_dtype=_tf_dtype(loader.dtype, "the store"),
            index_dtype=index_dtype,
            label_specs=labels,
            sample_shape=dims,
            expand_on=_check_expand(expand),
            buffers=_host_pool(loader, dims) if host_coo else None,
            bundle=_bundle_size(loader) if host_coo else 1,
        )

    # -- host side: what crosses the boundary
    def signature(self) -> tuple[tf.TensorSpec, ...]:
        """The exact ``output_signature`` of the generator (compact parts, then labels)."""
        if self.dense:
            x = (tf.TensorSpec((None, self.n_cols), self.values_dtype, name="dense"),)
        elif self.expand_on == "host":
            x = (
                tf.TensorSpec((None, 1 + len(self.tail)), tf.int64, name="coords"),
                tf.TensorSpec((None,), self.values_dtype, name="values"),
                tf.TensorSpec((), tf.int64, name="n_rows"),
            )
        else:
            x = (
                tf.TensorSpec((None,), self.values_dtype, name="values"),
                tf.TensorSpec((None,), tf.as_dtype(self.index_dtype), name="indices"),
                tf.TensorSpec((None,), tf.int64, name="row_splits"),
            )
        return x + self.label_specs

    def wire_signature(self) -> tuple[tf.TensorSpec, ...]:
        """What one ``numpy_function`` call returns: :meth:`signature`, or for bundles of
        host COO batches their coordinates, values and labels end to end with the values'
        and rows' offsets of each batch (``nnz_splits``, ``row_splits``)."""
        sig = self.signature()
        if self.bundle == 1:
            return sig
        return (*sig[:2], tf.TensorSpec((None,), tf.int64, name="nnz_splits"),
                tf.TensorSpec((None,), tf.int64, name="row_splits"), *sig[3:])

    def wire_parts(self, batches: list[Batch]) -> tuple[np.ndarray, ...]:
        """The :meth:`wire_signature` arrays of consecutive batches (one unless bundled)."""
        if self.bundle == 1:
            (batch,) = batches
            return self.parts(batch)
        assert self.buffers is not None
        nnz_splits = np.zeros(len(batches) + 1, np.int64)
        np.cumsum([b.values.size for b in batches], out=nnz_splits[1:])
        row_splits = np.zeros(len(batches) + 1, np.int64)
        np.cumsum([b.n_rows for b in batches], out=row_splits[1:])
        total = int(nnz_splits[-1])
        coords = self.buffers.take((total, 1 + len(self.tail)), np.int64)
        values = self.buffers.take((total,), batches[0].values.dtype)
        for b, lo, hi in zip(batches, nnz_splits[:-1], nnz_splits[1:], strict=True):
            self._coords_into(b, coords[lo:hi])
            values[lo:hi] = b.values
        labels = tuple(np.concatenate(ls) for ls in zip(*(b.labels for b in batches),
                                                        strict=True))
        return (coords, values, nnz_splits, row_splits, *labels)

    def unbundle(self, *wire: tf.Tensor) -> tuple[Any, ...]:
        """Graph side of a bundle: ragged parts whose ``unbatch`` gives each batch's parts
        in :meth:`signature` order (ragged slicing runs in ``unbatch``'s C++ loop, several
        times cheaper per batch than a ``map`` cutting them out with slicing ops)."""
        coords, values, nnz_splits, row_splits, *labels = wire

        def ragged(t: tf.Tensor, splits: tf.Tensor) -> tf.RaggedTensor:
            return tf.RaggedTensor.from_row_splits(t, splits, validate=False)

        return (ragged(coords, nnz_splits), ragged(values, nnz_splits),
                row_splits[1:] - row_splits[:-1], *(ragged(y, row_splits) for y in labels))

    def parts(self, batch: Batch) -> tuple[np.ndarray, ...]:
        """The batch's compact arrays in :meth:`signature` order (no copy when dtypes match)."""
        if self.dense:
            return (batch.dense, *batch.labels)
        if self.expand_on == "host":
            return (*self._host_coo(batch), *batch.labels)
        return (
            batch.values,
            batch.indices.astype(self.index_dtype, copy=False),
            batch.row_splits,
            *batch.labels,
        )

    def _host_coo(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, np.int64]:
        """``(coords, values, n_rows)``: int64 COO coordinates (:func:`coo_into`), aligned."""
        assert self.buffers is not None
        nnz, tail = int(batch.values.size), self.tail
        coords = self.buffers.take((nnz, 1 + len(tail)), np.int64)
        self._coords_into(batch, coords)
        values = self.buffers.take((nnz,), batch.values.dtype)
        values[...] = batch.values
        return coords, values, np.int64(batch.n_rows)

    def _coords_into(self, batch: Batch, coords: np.ndarray) -> None:
        coo_into(batch.row_splits, batch.indices, coords, wait=True)
        if len(self.tail) > 1:  # row-major unravel of the flat column id, as tf.unravel_index
            for j, sub in enumerate(np.unravel_index(batch.indices, self.tail), start=1):
                coords[:, j] = sub

    # -- graph side: the parts -> SparseTensor / dense Tensor
    def expand(self, *parts: tf.Tensor) -> Any:
        """Build the element from the parts with TensorFlow ops (traced once, in the graph)."""
        n_x = 1 if self.dense else 3
        if self.dense:
            x = self._dense(parts[0])
        elif self.expand_on == "host":
            x = tf.sparse.SparseTensor(parts[0], parts[1], self._dense_shape(parts[2]))
        else:
            x = self._sparse(*parts[:3])
        labels = parts[n_x:]
        return (x, *labels) if self.label_specs else x

    def element_spec(self) -> Any:
        """The structure :meth:`expand` returns (``x``, or ``(x, labels...)``)."""
        x: Any = (
            tf.TensorSpec((None, *self.tail), self.values_dtype)
            if self.dense
            else tf.SparseTensorSpec((None, *self.tail), self.values_dtype)
        )
        labels = tuple(tf.TensorSpec(s.shape, s.dtype) for s in self.label_specs)
        return (x, *labels) if labels else x

    def _dense(self, dense: tf.Tensor) -> tf.Tensor:
        if self.sample_shape is None:
            return dense
        return tf.reshape(dense, (-1, *self.sample_shape))

    def _sparse(self, values: tf.Tensor, indices: tf.Tensor, row_splits: tf.Tensor) -> Any:
        n_rows = tf.shape(row_splits, out_type=tf.int64)[0] - 1
        rows = tf.ragged.row_splits_to_segment_ids(row_splits, out_type=tf.int64)
        cols = tf.cast(indices, tf.int64)
        if self.sample_shape is None:
            coords = tf.stack([rows, cols], axis=1)
            tail: Sequence[int] = (self.n_cols,)
        else:
            tail = self.sample_shape
            # (k, nnz) -> (nnz, k): row-major order of the flat column id is kept.
            sub = tf.unravel_index(cols, tf.constant(tail, tf.int64))
            coords = tf.concat([rows[:, None], tf.transpose(sub)], axis=1)
        return tf.sparse.SparseTensor(coords, values, self._dense_shape(n_rows))

    def _dense_shape(self, n_rows: tf.Tensor) -> tf.Tensor:
        # A stack of a scalar and constants gives the static shape [None, *tail].
        return tf.stack([n_rows, *(tf.constant(d, tf.int64) for d in self.tail)])


def _host_pool(loader: DataLoader, sample_shape: tuple[int, ...] | None) -> BufferPool:
    """The pool the host COO parts come from, its idle memory bounded by ``HOST_IDLE_BATCHES``
    average batches: batches' sizes vary, so an unbounded pool would keep gathering idle
    blocks of ever more sizes."""
    coord_cols = 1 + (len(sample_shape) if sample_shape is not None else 1)
    per_value = 8 * coord_cols + np.dtype(loader.dtype).itemsize  # coordinates, value
    batch_bytes = _values_per_batch(loader) * per_value
    idle = max(8 * 2**20, int(HOST_IDLE_BATCHES * batch_bytes))
    return BufferPool(max_free=64, max_idle_bytes=idle)


def _bundle_size(loader: DataLoader) -> int:
    """Batches per hand-off: enough that each carries about ``BUNDLE_NNZ`` values (the
    hand-off's fixed cost then stays small beside its size), one for large batches."""
    return int(min(MAX_BUNDLE, max(1, BUNDLE_NNZ // max(1.0, _values_per_batch(loader)))))


def _values_per_batch(loader: DataLoader) -> float:
    """Non-zeros in an average batch of ``loader``, from its store's mean row."""
    st = loader.store
    return loader.batch_size * st.nnz / max(1, st.n_rows)
