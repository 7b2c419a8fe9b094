"""TensorFlow backend: a :class:`sparsestore.DataLoader` as a ``tf.data.Dataset``.

Batches cross into TensorFlow through ``tf.numpy_function`` calls (see ``_Passes``), with
an exact signature, in one of two forms (``expand=``):

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

import itertools
import queue
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import tensorflow as tf

# The source under Dataset.from_generator: private, so a TensorFlow release that moves it
# fails this import at once rather than changing behaviour (requirements/ pins the version).
from tensorflow.python.data.ops.from_generator_op import _GeneratorDataset

from sparsestore.adapters._tf_errors import _remember, _StoreErrorsDataset, unwrap_error
from sparsestore.adapters._tf_plan import _Plan
from sparsestore.batch import Batch
from sparsestore.errors import InvalidInputError
from sparsestore.loader import DataLoader, Position
from sparsestore.reader import THREAD_PREFIX

AUTOTUNE = tf.data.AUTOTUNE

__all__ = [
    "AUTOTUNE", "TensorFlowBackend", "distribute", "element_spec", "to_dataset", "unwrap_error",
]


# ------------------------------------------------------------------ element spec


def element_spec(loader: DataLoader, *, sample_shape: Sequence[int] | None = None) -> Any:
    """The ``element_spec`` :func:`to_dataset` gives for ``loader`` (without building it)."""
    return _Plan.for_loader(loader, sample_shape).element_spec()


# ------------------------------------------------------------------ passes


class _Moves:
    """Counts the calls that set a loader's epoch or position (``set_epoch``,
    ``load_state_dict``), as the loader reports them to its position listeners.

    Counting calls, rather than comparing the loader's position, does not depend on when
    TensorFlow gets round to closing an abandoned pass, and sees a ``set_epoch`` to the
    epoch the loader already has.
    """

    def __init__(self) -> None:
        self.count = 0

    @classmethod
    def of(cls, loader: DataLoader) -> _Moves:
        """The counter of ``loader``, listening to it from first use (one per loader)."""
        with _MOVES_LOCK:
            moves = _MOVES.get(loader)
            if moves is None:
                moves = _MOVES[loader] = cls()
                loader.add_position_listener(moves._moved)
        return moves

    def _moved(self, event: str, _position: Position) -> None:
        if event != "epoch_end":
            self.count += 1


# Loaders seen by the adapter -> their counters (the counters hold no reference to them).
_MOVES: weakref.WeakKeyDictionary[DataLoader, _Moves] = weakref.WeakKeyDictionary()
_MOVES_LOCK = threading.Lock()


class _Passes:
    """The loader's passes as a dataset: every iteration of it runs one pass (one epoch).

    A completed pass advances the loader's epoch itself; a pass cut short (``take``, a
    dropped iterator) does not, so the next one moves it on: each new iteration of the
    dataset is a new epoch.  If the loader was changed since that pass began
    (``set_epoch``, ``load_state_dict``), the next pass follows the loader instead: the
    loader reports those calls to its position listeners (:class:`_Moves`).

    The dataset is TensorFlow's own generator source (``_GeneratorDataset``, the class
    under ``Dataset.from_generator``), with three ``tf.numpy_function`` calls: one opens a
    pass when TensorFlow makes an iterator, one per batch (or bundle) returns the plan's
    wire parts as they are (dtypes and shapes fixed by the plan), one closes the pass when
    TensorFlow destroys the iterator (end of pass or dropped).  ``from_generator`` itself
    adds per-element signature checks and, built as a pass opener with a ``flat_map`` of
    per-batch calls, four more functions that TensorFlow instantiates for every iterator:
    a fixed cost on every pass (each Keras epoch; ``benchmarks/results/design_notes.md``,
    "The fixed cost of each pass").
    """

    def __init__(self, loader: DataLoader, plan: _Plan) -> None:
        self.loader = loader
        self.plan = plan
        self.completed = True
        self.moves = _Moves.of(loader)
        self.moves_at_start = self.moves.count
        self._open: dict[int, _OpenPass] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def run(self) -> Iterator[Batch]:
        """One pass: the loader's batches (advancing its epoch first if the last pass was
        cut short and nobody moved the loader since)."""
        loader = self.loader
        if not self.completed and self.moves.count == self.moves_at_start:
            loader.set_epoch(loader.epoch + 1)
        self.completed, self.moves_at_start = False, self.moves.count
        batches = loader.iter_batches()
        try:
            yield from batches
            self.completed = True
        finally:
            batches.close()

    # -- what TensorFlow calls, through numpy_function
    def _start(self, _unused: np.ndarray) -> np.int64:
        """Start a pass (TensorFlow made an iterator) and return its id.

        Its first batch is read here so that its length is known: the rest of the epoch
        after a ``load_state_dict``, else ``len(loader)``.
        """
        gen = self.run()
        error: BaseException | None = None
        try:
            first = next(gen, None)
        except Exception as exc:  # noqa: BLE001 - raised by the first next() instead:
            first, error = None, exc  # TensorFlow would retry a failed open for ever
        n = 1 if error is not None else 0
        if first is not None:
            n = len(self.loader) - self.loader.position.batches_consumed + 1
            gen = _after(first, gen)
        open_pass = _OpenPass(gen, self.plan.wire_parts, n, self.loader.num_workers,
                              self.plan.bundle, error)
        with self._lock:
            pid = next(self._ids)
            self._open[pid] = open_pass
        return np.int64(pid)

    def _next(self, pid: np.ndarray) -> tuple[np.ndarray, ...]:
        """The pass's next wire parts; ``StopIteration`` (end of sequence) after its last."""
        return self._open[int(pid)].next()

    def _close(self, pid: np.ndarray) -> np.int64:
        """TensorFlow destroyed the iterator: stop the pass's threads."""
        with self._lock:
            open_pass = self._open.pop(int(pid), None)
        if open_pass is not None:
            open_pass.close()
        return np.int64(0)

    def dataset(self) -> tf.data.Dataset:
        """The elements of each pass, one ``tf.numpy_function`` call per batch or per
        bundle of ``plan.bundle`` batches (cut apart in the graph).  A batch per call is
        expanded in the generator's own ``next`` function: a ``map`` after it would add a
        function that TensorFlow instantiates for every iterator and runs for every batch
        (``benchmarks/results/design_notes.md``, "Kept")."""
        sig = self.plan.wire_signature()
        dtypes = [s.dtype for s in sig]
        plain = tf.autograph.experimental.do_not_convert

        @plain
        def open_pass(unused: tf.Tensor) -> tf.Tensor:
            return tf.numpy_function(self._start, [unused], tf.int64, stateful=True)

        @plain
        def next_parts(pid: tf.Tensor) -> tuple[tf.Tensor, ...]:
            out = tf.numpy_function(self._next, [pid], dtypes, stateful=True)
            for t, s in zip(out, sig, strict=True):
                t.set_shape(s.shape)
            return tuple(out)

        @plain
        def close_pass(pid: tf.Tensor) -> tf.Tensor:
            return tf.numpy_function(self._close, [pid], tf.int64, stateful=True)

        # Pure TensorFlow ops with no data-dependent Python control flow: no autograph.
        expand = plain(self.plan.expand)
        if self.plan.bundle == 1:
            @plain
            def next_element(pid: tf.Tensor) -> Any:
                return expand(*next_parts(pid))

            return _GeneratorDataset(tf.constant(0, tf.int64), open_pass, next_element,
                                     close_pass, output_signature=self.plan.element_spec())
        ds = _GeneratorDataset(tf.constant(0, tf.int64), open_pass, next_parts, close_pass,
                               output_signature=sig)
        ds = ds.map(self.plan.unbundle).unbatch()
        return ds.map(expand, num_parallel_calls=AUTOTUNE, deterministic=True)


def _after(first: Batch, rest: Iterator[Batch]) -> Iterator[Batch]:
    """``first``, then ``rest``, closing ``rest`` when closed (unlike ``itertools.chain``)."""
    try:
        yield first
        yield from rest
    finally:
        rest.close()  # type: ignore[attr-defined]


_END = object()  # the feeder's last queue item: the loader's pass ran to its end


class _OpenPass:
    """One pass in progress: its batches' wire parts built ahead, handed over in order.

    A feeder thread runs the loader's pass (cutting batches, gathering shuffled rows),
    groups ``bundle`` consecutive batches and hands each group to ``workers`` builder
    threads that turn it into the plan's wire parts (the COO coordinates, in
    :func:`~sparsestore.kernels.coo_into`, which releases the GIL), so the thread
    TensorFlow calls through ``numpy_function`` only takes finished parts: its GIL-held
    share per hand-off is small and the same whatever the batches hold.  At most
    ``2 * workers + 1`` groups are read ahead of TensorFlow.  ``workers=0`` (a loader with
    ``num_workers=0``) does everything in the calling thread.  The last group waits for
    the loader's pass to end, which is where the loader books it as complete (its next
    epoch).
    """

    def __init__(self, batches: Iterator[Batch], build: Any, n: int, workers: int,
                 bundle: int = 1, error: BaseException | None = None) -> None:
        self.batches, self.build, self.left, self.bundle = batches, build, n, bundle
        self._error = error  # the pass failed to start: the first next() raises it
        if error is not None:
            workers = 0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._slots = threading.Semaphore(2 * workers + 1)
        self._stop = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._feeder: threading.Thread | None = None
        if workers and n:
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"{THREAD_PREFIX}-build")
            self._feeder = threading.Thread(
                target=self._feed, name=f"{THREAD_PREFIX}-feed", daemon=True)
            self._feeder.start()

    def _groups(self) -> Iterator[list[Batch]]:
        while group := list(itertools.islice(self.batches, self.bundle)):
            yield group

    def _feed(self) -> None:
        """Read the pass, submitting each group's build; queue a failure where it happened."""
        assert self._pool is not None
        try:
            for group in self._groups():
                while not self._slots.acquire(timeout=0.05):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                self._queue.put((len(group), self._pool.submit(self.build, group)))
            self._queue.put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, in order
            self._queue.put(exc)
        finally:
            self.batches.close()  # type: ignore[attr-defined]

    def _take(self) -> Any:
        """``(batch count, wire parts)`` of the next group, or ``_END`` once the pass is
        over, raising what the pass raised.  Called again only while ``left`` > 0: the end
        and any failure set it to 0."""
        try:
            if self._error is not None:
                raise self._error
            if self._feeder is None:
                group = next(self._groups(), None)
                return _END if group is None else (len(group), self.build(group))
            item = self._queue.get()
            if item is _END:
                return item
            if isinstance(item, BaseException):
                raise item
            self._slots.release()
            count, built = item
            return count, built.result()
        except BaseException as exc:
            # A failure ends the pass: TensorFlow, which may call again after an error
            # (prefetch, ignore_errors), then gets the end of the sequence, never a later
            # batch in the failed one's place.
            self.left = 0
            _remember(exc)
            raise

    def next(self) -> tuple[np.ndarray, ...]:
        if self.left == 0:
            raise StopIteration  # numpy_function turns it into TensorFlow's end of sequence
        got = self._take()
        if got is not _END:
            self.left -= got[0]
        if got is _END or self.left < 0 or (self.left == 0 and self._take() is not _END):
            self.left = 0
            raise RuntimeError(
                "sparsestore.DataLoader gave a different number of batches than len(loader) "
                "announced; please report this with the loader's options"
            )
        return got[1]

    def close(self) -> None:
        """Stop the feeder and the builders (TensorFlow finalized the pass)."""
        self._stop.set()
        if self._feeder is not None:
            self._feeder.join()
        else:
            self.batches.close()  # type: ignore[attr-defined]
        if self._pool is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if isinstance(item, tuple):
                    item[1].cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)


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


class TensorFlowBackend:
    """``DataLoader(store, backend="tensorflow")``: eager ``SparseTensor`` batches.

    Iterating the loader then gives what :func:`to_dataset` elements hold, built eagerly
    with the same TensorFlow ops; use :func:`to_dataset` for training input pipelines.
    """

    name = "tensorflow"

    def __init__(self, sample_shape: Sequence[int] | None = None) -> None:
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)
        self._plans: weakref.WeakKeyDictionary[DataLoader, _Plan] = weakref.WeakKeyDictionary()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # The per-loader plans are a cache of this process: a copy rebuilds its own.
        return type(self), (self.sample_shape,)

    def _plan(self, loader: DataLoader) -> _Plan:
        plan = self._plans.get(loader)
        if plan is None:
            plan = self._plans[loader] = _Plan.for_loader(loader, self.sample_shape)
        return plan

    def convert(self, batch: Batch, loader: DataLoader) -> Any:
        plan = self._plan(loader)
        parts = [
            tf.convert_to_tensor(a, dtype=spec.dtype)
            for a, spec in zip(plan.parts(batch), plan.signature(), strict=True)
        ]
        return plan.expand(*parts)

    def __repr__(self) -> str:
        return f"TensorFlowBackend(sample_shape={self.sample_shape})"
