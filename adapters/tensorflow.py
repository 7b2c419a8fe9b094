"""TensorFlow backend: a :class:`sparsestore.DataLoader` as a ``tf.data.Dataset``.

Batches cross into TensorFlow through ``tf.numpy_function`` calls (see ``_Passes`` in
``_tf_passes.py``), with an exact signature, in one of two forms (``expand=``):

* ``"host"`` (default): the COO ``int64`` coordinates are written by
  :func:`sparsestore.kernels.coo_into` (one compiled pass that releases the GIL, in the
  adapter's builder threads, several batches ahead) into 64-byte-aligned
  :class:`~sparsestore.buffers.BufferPool` buffers that TensorFlow takes over without
  copying and that are recycled once TensorFlow drops them; the graph only wraps them in
  a ``SparseTensor``.  Small batches cross in bundles of up to ``MAX_BUNDLE`` (about
  ``BUNDLE_NNZ`` values per call; both in ``_tf_plan.py``), cut apart again by ``unbatch``
  on ragged views, so the fixed cost of a ``numpy_function`` call is paid once per bundle.
* ``"graph"``: the compact CSR parts (values, int32 column ids, ``row_splits``: ~8 bytes
  per non-zero instead of 20) cross the boundary, one batch per call, and TensorFlow ops
  expand them (``tf.ragged.row_splits_to_segment_ids``) in the dataset's generator function.

Indices come out int64 in canonical row-major order (the loader's rows hold sorted,
unique column ids), so ``tf.sparse.reorder`` is a no-op and Keras / ``tf.sparse`` ops
take them as they are.

    import sparsestore.adapters.tensorflow as sstf
    ds = sstf.to_dataset(sparsestore.DataLoader(store, 512, shuffle=True, labels="y"))
    model.fit(ds, epochs=3)           # keras.Input(shape=(n_cols,), sparse=True)

Each new pass over the dataset (each Keras epoch) is the loader's next epoch, so shuffled
loaders reshuffle reproducibly from their seed.

A store error (``ChecksumError``, ``MissingChunkError``...) raised by a pass reaches a Python
loop over the dataset as itself; where TensorFlow raises its own error instead (in graph:
``ds.reduce``, ``model.fit``, a dataset transformed further), :func:`unwrap_error` gives
the store's error back.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _warm  # noqa: F401  (numba loads on its own thread while TensorFlow imports)

# isort: split
import tensorflow as tf

from sparsestore.backends import TwoStepBackend
from sparsestore.batch import Batch
from sparsestore.errors import InvalidInputError
from sparsestore.loader import DataLoader

from ._tf_errors import _StoreErrorsDataset, unwrap_error
from ._tf_passes import _Passes
from ._tf_plan import _Plan

AUTOTUNE = tf.data.AUTOTUNE

__all__ = [
    "AUTOTUNE", "TensorFlowBackend", "distribute", "element_spec", "to_dataset", "unwrap_error",
]


# ------------------------------------------------------------------ element spec


def element_spec(loader: DataLoader, *, sample_shape: Sequence[int] | None = None) -> Any:
    """The ``element_spec`` :func:`to_dataset` gives for ``loader`` (without building it)."""
    return _Plan.for_loader(loader, sample_shape).element_spec()


# ------------------------------------------------------------------ argument checks


def _check_prefetch(prefetch: Any) -> int | None:
    if prefetch is None:
        return None
    if isinstance(prefetch, bool) or not isinstance(prefetch, (int, np.integer)):
        raise InvalidInputError(
            f"prefetch must be an int, tf.data.AUTOTUNE or None, got {prefetch!r}"
        )
    prefetch = int(prefetch)
    if prefetch < 0 and prefetch != AUTOTUNE:
        raise InvalidInputError(f"prefetch must be >= 0 or tf.data.AUTOTUNE, got {prefetch}")
    return prefetch or None


def _check_repeat(repeat_epochs: Any) -> int | None:
    if repeat_epochs is None:
        return None
    if isinstance(repeat_epochs, bool) or not isinstance(repeat_epochs, (int, np.integer)) \
            or repeat_epochs < 1:
        raise InvalidInputError(
            f"repeat_epochs must be a positive int or None (repeat forever), got "
            f"{repeat_epochs!r}"
        )
    return int(repeat_epochs)


def _shard(loader: DataLoader, input_context: Any) -> DataLoader:
    """This input pipeline's share of the loader's rows (composed with its own rank)."""
    try:
        n = int(input_context.num_input_pipelines)
        pid = int(input_context.input_pipeline_id)
    except AttributeError:
        raise InvalidInputError(
            "input_context must be a tf.distribute.InputContext (it has num_input_pipelines "
            f"and input_pipeline_id), got {type(input_context).__name__}"
        ) from None
    if n > 1 and loader.position.batches_consumed:
        # A shard copy starts at its epoch's start: the position would be dropped silently
        # (and it counts the loader's own batches, not the pipeline's).
        raise InvalidInputError(
            f"the loader is at batch {loader.position.batches_consumed} of epoch "
            f"{loader.position.epoch} (load_state_dict or a pass in progress), but "
            f"input_context splits it into {n} pipelines, each a shard copy that starts at "
            "the epoch's start; to resume mid-epoch build each worker's own loader "
            "(rank=worker index, world_size=workers), load its state, and pass it to "
            "to_dataset without input_context"
        )
    return loader if n == 1 else loader.shard(pid, n)


def _device_available(device: str) -> bool:
    kind = (tf.DeviceSpec.from_string(device).device_type or "CPU").upper()
    return bool(tf.config.list_logical_devices(kind))


def to_dataset(
    loader: DataLoader,
    *,
    input_context: tf.distribute.InputContext | None = None,
    sample_shape: Sequence[int] | None = None,
    prefetch: int | None = AUTOTUNE,
    repeat_epochs: int | None = 1,
    device: str | None = None,
    cardinality: bool = True,
    expand: str = "host",
    autotune: bool = False,
) -> tf.data.Dataset:
    """The loader's batches as a ``tf.data.Dataset``, equal to its own and in the same order.

    Elements are ``tf.sparse.SparseTensor`` ``[batch, n_cols]`` (int64 canonical row-major
    indices, the store's dtype, the batch's real row count) -- dense ``tf.Tensor`` for dense
    stores -- or ``(x, labels...)`` when the loader has labels (one label gives Keras'
    ``(x, y)``).  Options:

    * ``input_context``: a ``tf.distribute.InputContext``; the dataset then reads only
      pipeline ``input_pipeline_id`` of ``num_input_pipelines`` (through
      ``loader.shard``).  ``loader.batch_size`` is the per-replica batch.  A shard copy
      starts at the epoch's start, so a loader resumed mid-epoch is refused here when
      there are several pipelines: resume per-worker loaders (``rank=``/``world_size=``)
      and give each to ``to_dataset`` without ``input_context`` instead.
    * ``sample_shape``: e.g. ``(r, c)``; each row (a flattened ``r x c`` sample) comes out
      as ``[batch, r, c]``, the coordinates computed in graph from the column id.
    * ``prefetch``: host-side ``Dataset.prefetch`` buffer (``None`` or 0: none).
    * ``repeat_epochs``: passes per iteration of the dataset (``None``: forever, e.g. with
      ``steps_per_epoch``); every pass is the loader's next epoch.
    * ``device``: e.g. ``"/GPU:0"``: stage batches on that device with
      ``tf.data.experimental.prefetch_to_device`` (the last step).  Skipped with a warning
      when no such device exists, so one script runs on CPU-only hosts.
    * ``expand``: ``"host"`` (default) or ``"graph"``: where the COO coordinates are
      built (see the module docstring; both give identical elements).
    * ``autotune``: leave TensorFlow's dataset tuning on for this pipeline: its autotuner
      and its default graph rewrites.  Off by default: the loader already decodes and
      prefetches in its own threads and the maps here are trivial, while the autotuner's
      model thread made dropping an iterator (the end of every Keras epoch) stall at
      times, and the rewrites, redone for every new iterator, add a fixed cost to every
      pass (``benchmarks/results/design_notes.md``).  Turn it on when you add heavy
      ``map`` steps with ``AUTOTUNE`` after this dataset.
    * ``cardinality``: declare ``len(loader)`` batches per pass so Keras knows the epoch
      length.  Resume with ``load_state_dict`` *before* calling this (a resumed pass is
      shorter; its dataset then has unknown cardinality) or pass ``cardinality=False``.

    ``loader.state_dict()`` counts the batches read from the loader: those handed to
    TensorFlow (prefetched ones included) and those being built ahead (up to
    ``2 * loader.num_workers + 1`` hand-offs of ``bundle`` batches), so a checkpoint taken
    mid-epoch resumes that many batches late.

    A store error (``ChecksumError``...) reaches a Python loop over the returned dataset as
    itself; in graph, TensorFlow raises its own error: :func:`unwrap_error` maps it back.
    """
    plan = _Plan.for_loader(loader, sample_shape, expand)
    prefetch = _check_prefetch(prefetch)
    repeat = _check_repeat(repeat_epochs)
    if input_context is not None:
        loader = _shard(loader, input_context)
    ds = _Passes(loader, plan).dataset()
    if cardinality and loader.position.batches_consumed == 0:
        ds = ds.apply(tf.data.experimental.assert_cardinality(len(loader)))
    if repeat is None:
        ds = ds.repeat()
    elif repeat > 1:
        ds = ds.repeat(repeat)
    opts = tf.data.Options()
    opts.autotune.enabled = bool(autotune)
    # TensorFlow rewrites the pipeline's graph each time an iterator is made (each pass,
    # each Keras epoch); its default rewrites find nothing to fuse here.
    opts.experimental_optimization.apply_default_optimizations = bool(autotune)
    if input_context is not None:
        # Already sharded by rows: tf.distribute must not shard the batches again.
        opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    ds = ds.with_options(opts)
    if prefetch is not None:
        ds = ds.prefetch(prefetch)
    if device is not None:
        if _device_available(device):
            buffer = None if prefetch in (None, AUTOTUNE) else prefetch
            ds = ds.apply(tf.data.experimental.prefetch_to_device(device, buffer_size=buffer))
        else:
            warnings.warn(
                f"device {device!r} not found (visible: "
                f"{[d.name for d in tf.config.list_logical_devices()]}); batches stay on the "
                "host", RuntimeWarning, stacklevel=2,
            )
    return _StoreErrorsDataset(ds)


def distribute(
    strategy: tf.distribute.Strategy, loader: DataLoader, **options: Any
) -> tf.distribute.DistributedDataset:
    """The loader through ``strategy.distribute_datasets_from_function``, sharded per pipeline.

    ``loader.batch_size`` is the per-replica batch; ``options`` go to :func:`to_dataset`
    (``device`` is left to the strategy, which places batches on its replicas itself).
    Use it with a custom loop (``strategy.run``): Keras 3.15's ``model.fit`` under a
    multi-replica strategy fails on any ``SparseTensor`` input (its first-batch build calls
    ``strategy.reduce`` on the batch, and ``SparseTensor`` has no ``device``).  Each
    pipeline reads a ``loader.shard`` copy that starts at an epoch's start: to resume
    several workers mid-epoch, give each worker a loader of its own rank and pass
    ``to_dataset(loader)`` to ``distribute_datasets_from_function`` (see
    ``examples/tf_multiworker.py``).
    """
    if "input_context" in options or "device" in options:
        raise InvalidInputError(
            "distribute() sets input_context and device placement itself; pass neither"
        )

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        return to_dataset(loader, input_context=ctx, **options)

    return strategy.distribute_datasets_from_function(dataset_fn)


# ------------------------------------------------------------------ backend plugin


class TensorFlowBackend(TwoStepBackend):
    """``DataLoader(store, backend="tensorflow")``: eager ``SparseTensor`` batches.

    Iterating the loader then gives what :func:`to_dataset` elements hold, built eagerly
    with the same TensorFlow ops; use :func:`to_dataset` for training input pipelines.
    ``host`` is the wire format's numpy side (``_Plan.parts``: the COO coordinates by
    ``coo_into`` into pooled buffers), the very function :func:`to_dataset`'s builder
    threads run; ``wrap`` turns those arrays into tensors and the ``SparseTensor``.
    """

    name = "tensorflow"

    def __init__(self, sample_shape: Sequence[int] | None = None) -> None:
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)
        self._plans: weakref.WeakKeyDictionary[DataLoader, _Plan] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # The per-loader plans are a cache of this process: a copy rebuilds its own.
        return type(self), (self.sample_shape,)

    def _plan(self, loader: DataLoader) -> _Plan:
        with self._lock:  # host runs on stage threads: one plan (one buffer pool) per loader
            plan = self._plans.get(loader)
            if plan is None:
                plan = self._plans[loader] = _Plan.for_loader(loader, self.sample_shape)
        return plan

    def host(self, batch: Batch, loader: DataLoader) -> tuple[np.ndarray, ...]:
        """The batch's wire arrays (``_Plan.parts``), in the plan's signature order."""
        return self._plan(loader).parts(batch)

    def wrap(self, parts: tuple[np.ndarray, ...], loader: DataLoader) -> Any:
        """Tensors over the wire arrays, expanded by the plan's TensorFlow ops."""
        plan = self._plan(loader)
        tensors = [tf.convert_to_tensor(a, dtype=spec.dtype)
                   for a, spec in zip(parts, plan.signature(), strict=True)]
        return plan.expand(*tensors)

    def __repr__(self) -> str:
        return f"TensorFlowBackend(sample_shape={self.sample_shape})"
