"""JAX backend: a :class:`sparsestore.DataLoader`'s batches as ``jax.experimental.sparse`` arrays.

``DataLoader(store, backend="jax")`` yields ``BCOO`` ``[batch, n_cols]`` matrices (``BCSR``
with ``JaxBackend(format="bcsr")``; dense ``jax.Array`` for dense stores) and labels as
``jax.Array``, as ``(x, labels...)`` when the loader has labels.  The backend's ``host``
step writes the COO coordinates with :func:`sparsestore.kernels.coo_into` (one compiled
pass that releases the GIL, where numba is installed) on the loader's stage thread, ahead
of the consumer; its ``wrap`` step puts the arrays on the device in one ``jax.device_put``
per batch and builds the ``BCOO``.  :func:`prefetch_to_device` moves the ``device_put``
onto the stage thread too, so transfers run ahead of the training step.

    import sparsestore.adapters.jax as ssjax
    loader = ssjax.sharded_loader(store, batch_size=512, shuffle=True, labels="y")
    for x, y in ssjax.prefetch_to_device(loader, size=2):   # x: BCOO, y: jax.Array
        params = step(params, x, y)

JAX keeps 32-bit types unless ``jax_enable_x64`` is on: values and labels are cast to
JAX's canonical dtype (``int64`` labels come out ``int32``, ``float64`` as ``float32``).
Each batch has its own number of non-zeros, so a ``jit``-ed step would compile once per
distinct ``nse``; ``JaxBackend(pad_nnz=True)`` pads each batch up to the next power of
two with out-of-bounds entries (``BCOO``'s padding convention: ``todense``, ``@`` and
``sum_duplicates`` ignore them), so a pass compiles a handful of shapes.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _warm  # noqa: F401  (numba loads on its own thread while JAX imports)

# isort: split
import jax
import numpy as np
from jax.experimental import sparse as jsparse

from sparsestore.backends import TwoStepBackend
from sparsestore.errors import DTypeError, InvalidInputError
from sparsestore.kernels import coo_into
from sparsestore.loader import DataLoader

if TYPE_CHECKING:
    from sparsestore.loader import Batch

__all__ = ["HostBatch", "JaxBackend", "prefetch_to_device", "sharded_loader", "to_py_dataset"]

FORMATS = ("bcoo", "bcsr")


def _jax_dtype(dtype: Any, what: str) -> np.dtype:
    """JAX's canonical dtype for ``dtype`` (32-bit without x64); a clear error if none."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise DTypeError(
            f"{what} has dtype {dtype}, which JAX cannot hold; store it as a numeric dtype"
        )
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def _index_dtype(n_rows: int, n_cols: int) -> np.dtype:
    """int32 coordinates when every id (and the padding id ``n``) fits, else int64."""
    return np.dtype(np.int32 if max(n_rows, n_cols) < np.iinfo(np.int32).max else np.int64)


def _padded(nse: int) -> int:
    """The next power of two at or above ``nse`` (at least 1): few distinct jit shapes."""
    return 1 << (max(1, int(nse)) - 1).bit_length()


class HostBatch(NamedTuple):
    """What :meth:`JaxBackend.host` gives: the arrays one batch becomes on the device (x's
    parts, then the labels; numpy, or device arrays once put there) and x's shape."""

    arrays: tuple[Any, ...]
    shape: tuple[int, int]
    dense: bool
    n_labels: int


class JaxBackend(TwoStepBackend):
    """``DataLoader(store, backend="jax")``: ``BCOO`` (or ``BCSR``) batches, labels as arrays.

    ``format``: ``"bcoo"`` (default) or ``"bcsr"``; ``pad_nnz``: pad the non-zeros to a
    power of two (``BCOO`` only) so ``jit`` sees few shapes; ``device``: where
    ``jax.device_put`` puts the arrays (default: JAX's default device).
    """

    name = "jax"

    def __init__(self, format: str = "bcoo", pad_nnz: bool = False, device: Any = None) -> None:
        if format not in FORMATS:
            raise InvalidInputError(f"format must be one of {FORMATS}, got {format!r}")
        if pad_nnz and format != "bcoo":
            raise InvalidInputError("pad_nnz applies to BCOO batches; use format='bcoo'")
        self.format, self.pad_nnz, self.device = format, bool(pad_nnz), device
        self._dtypes: weakref.WeakKeyDictionary[DataLoader, tuple] = weakref.WeakKeyDictionary()

    def _plan(self, loader: DataLoader) -> tuple[np.dtype, tuple[np.dtype, ...]]:
        """The value and label dtypes JAX will hold, checked once per loader."""
        plan = self._dtypes.get(loader)
        if plan is None:
            labels = tuple(_jax_dtype(dt, f"label {name!r}") for name, dt, _ in loader.label_specs)
            plan = self._dtypes[loader] = (_jax_dtype(loader.dtype, "the store"), labels)
        return plan

    def host(self, batch: Batch, loader: DataLoader) -> HostBatch:
        """The numpy arrays of one batch in JAX's dtypes (BCOO coordinates by ``coo_into``)."""
        vdt, ldts = self._plan(loader)
        labels = tuple(np.asarray(lab, dtype=dt) for lab, dt in zip(batch.labels, ldts,
                                                                    strict=True))
        n, m = batch.n_rows, batch.n_cols
        if batch.dense is not None:
            return HostBatch((np.asarray(batch.dense, dtype=vdt), *labels), (n, m), True,
                             len(labels))
        idt = _index_dtype(n, m)
        values = np.asarray(batch.values, dtype=vdt)
        if self.format == "bcsr":
            x: tuple[np.ndarray, ...] = (values, np.asarray(batch.indices, dtype=idt),
                                         np.asarray(batch.row_splits, dtype=idt))
            return HostBatch((*x, *labels), (n, m), False, len(labels))
        nnz = values.size
        size = _padded(nnz) if self.pad_nnz else nnz
        coords = np.empty((size, 2), dtype=idt)
        coo_into(batch.row_splits, batch.indices, coords[:nnz], wait=True)
        if size > nnz:  # BCOO padding: out-of-bounds coordinates with zero values
            coords[nnz:] = (n, m)
            values = np.concatenate([values, np.zeros(size - nnz, dtype=vdt)])
        return HostBatch((values, coords, *labels), (n, m), False, len(labels))

    def wrap(self, parts: HostBatch, loader: DataLoader) -> Any:
        """The batch's arrays on ``device`` (one ``device_put``) as ``x`` or ``(x, labels...)``."""
        return self.assemble(parts._replace(arrays=tuple(jax.device_put(parts.arrays,
                                                                        self.device))))

    def assemble(self, parts: HostBatch) -> Any:
        """``x`` or ``(x, labels...)`` from arrays already where they will be used."""
        arrays, n_labels = parts.arrays, parts.n_labels
        labels = arrays[len(arrays) - n_labels:]
        if parts.dense:
            x = arrays[0]
        elif self.format == "bcsr":
            x = jsparse.BCSR((arrays[0], arrays[1], arrays[2]), shape=parts.shape,
                             indices_sorted=True, unique_indices=True)
        else:
            x = jsparse.BCOO((arrays[0], arrays[1]), shape=parts.shape, indices_sorted=True,
                             unique_indices=not self.pad_nnz)
        return (x, *labels) if n_labels else x

    def __repr__(self) -> str:
        return f"JaxBackend(format={self.format!r}, pad_nnz={self.pad_nnz}, device={self.device})"


def _backend_of(loader: DataLoader) -> JaxBackend:
    backend = loader.backend
    return backend if isinstance(backend, JaxBackend) else JaxBackend()


class _PutAhead:
    """A JAX backend whose ``host`` step also puts the arrays on the device and builds the
    ``BCOO`` (JAX's arrays and pytrees are thread-agnostic), on the stage thread, ahead of
    the consumer; ``wrap`` hands it on."""

    name = "jax"

    def __init__(self, backend: JaxBackend, device: Any) -> None:
        self.backend, self.device = backend, device

    def host(self, batch: Batch, loader: DataLoader) -> Any:
        parts = self.backend.host(batch, loader)
        return self.backend.assemble(
            parts._replace(arrays=tuple(jax.device_put(parts.arrays, self.device))))

    def wrap(self, parts: Any, loader: DataLoader) -> Any:
        return parts


def prefetch_to_device(loader: DataLoader, size: int = 2, device: Any = None) -> Iterator[Any]:
    """One pass of the loader with ``size`` batches already on ``device``, staged by a thread.

    The loader's stage thread (:meth:`~sparsestore.DataLoader.iter_converted`) cuts each
    batch, builds its arrays, ``jax.device_put`` s them (asynchronous on accelerators) and
    builds the ``BCOO``, keeping at most ``size`` ahead of the consumer, so host work and
    the transfer overlap the training step; one stage thread even when the loader has
    ``num_workers=0``.  Batches are those
    of the loader's JAX backend (a plain ``JaxBackend()`` if it has another one).  Errors
    (e.g. :class:`~sparsestore.errors.ChecksumError`) re-raise in the consumer; closing the
    iterator early stops the thread and closes the pass.
    """
    if not isinstance(loader, DataLoader):
        raise InvalidInputError(f"expected a sparsestore.DataLoader, got {type(loader).__name__}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidInputError(f"size must be a positive int, got {size!r}")
    backend = _backend_of(loader)
    target = device if device is not None else backend.device
    return loader.iter_converted(_PutAhead(backend, target), prefetch=size, threads=1)


def sharded_loader(store: Any, backend: Any = "jax", **options: Any) -> DataLoader:
    """A loader of this JAX process's rows: rank ``process_index()`` of ``process_count()``."""
    if "rank" in options or "world_size" in options:
        raise InvalidInputError("sharded_loader sets rank and world_size from jax; pass neither")
    return DataLoader(store, rank=jax.process_index(), world_size=jax.process_count(),
                      backend=backend, **options)


def to_py_dataset(loader: DataLoader, **kwargs: Any) -> Any:
    """The loader as a ``keras.utils.PyDataset`` for ``model.fit`` on Keras' JAX backend.

    Keras takes a Python generator only with ``steps_per_epoch`` and cannot restart it per
    epoch; this adapter gives it ``len(loader)`` and serves index ``i`` from the running
    pass (Keras asks in order with ``shuffle=False`` and no workers), starting the loader's
    next epoch at index 0.  Cost: one Python call per batch, nothing copied.
    """
    import keras

    class LoaderPyDataset(keras.utils.PyDataset):
        """Sequential PyDataset over a streaming loader (indices must come in order)."""

        def __init__(self) -> None:
            super().__init__(**kwargs)
            self._it: Iterator[Any] | None = None
            self._next = 0

        def __len__(self) -> int:
            return len(loader)

        def __getitem__(self, index: int) -> Any:
            if index == 0 or self._it is None:
                if self._it is not None:
                    self._it.close()
                self._it, self._next = iter(loader), 0
            if index != self._next:
                raise InvalidInputError(
                    f"batch {index} asked out of order (expected {self._next}): the loader "
                    "streams; pass shuffle=False to fit and leave workers at 0"
                )
            self._next += 1
            item = next(self._it)
            if self._next == len(self):  # finish the pass: the loader moves to its next epoch
                for _ in self._it:
                    pass
                self._it = None
            return item

        def on_epoch_end(self) -> None:
            if self._it is not None:
                self._it.close()
            self._it = None

    return LoaderPyDataset()
