"""The passes of a :func:`~sparsestore.adapters.tensorflow.to_dataset` pipeline.

:class:`_Passes` is the loader's passes as a dataset: TensorFlow's generator source with
``tf.numpy_function`` calls that open a pass, take its next wire parts and close it;
:class:`_OpenPass` is one pass in progress, its stage's feeder and builder threads
building the plan's wire parts (:mod:`._tf_plan`) ahead of TensorFlow; :class:`_Moves`
counts the calls that move a loader (``set_epoch``, ``load_state_dict``), so an abandoned
pass does not advance an epoch somebody already set.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf

# The source under Dataset.from_generator: private, so a TensorFlow release that moves it
# fails this import at once rather than changing behaviour (requirements/ pins the version).
from tensorflow.python.data.ops.from_generator_op import _GeneratorDataset

from sparsestore.batch import Batch
from sparsestore.buffers import restore_mmap_threshold
from sparsestore.engine import OrderedMap
from sparsestore.loader import DataLoader, Position
from sparsestore.reader import THREAD_PREFIX

from ._tf_errors import _remember
from ._tf_plan import _Plan

AUTOTUNE = tf.data.AUTOTUNE


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
        # TensorFlow pinned glibc's mmap threshold when it built the dataset: without this,
        # every chunk's Blosc scratch is a fresh mmap, page-faulted in (see buffers.py).
        restore_mmap_threshold()
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


_END = object()  # the stage's end: the loader's pass ran to its end


class _Groups:
    """The pass's batches, ``bundle`` at a time; closing it closes the pass (even one
    never started, which a generator's ``close`` would not)."""

    def __init__(self, batches: Iterator[Batch], bundle: int) -> None:
        self.batches, self.bundle = batches, bundle

    def __iter__(self) -> _Groups:
        return self

    def __next__(self) -> list[Batch]:
        group = list(itertools.islice(self.batches, self.bundle))
        if not group:
            raise StopIteration
        return group

    def close(self) -> None:
        self.batches.close()  # type: ignore[attr-defined]


class _OpenPass:
    """One pass in progress: its batches' wire parts built ahead, handed over in order.

    An :class:`~sparsestore.engine.OrderedMap` runs it: its feeder thread runs the loader's
    pass (cutting batches, gathering shuffled rows), groups ``bundle`` consecutive batches
    and hands each group to ``workers`` builder threads that turn it into the plan's wire
    parts (the COO coordinates, in :func:`~sparsestore.kernels.coo_into`, which releases
    the GIL), so the thread TensorFlow calls through ``numpy_function`` only takes finished
    parts: its GIL-held share per hand-off is small and the same whatever the batches
    hold.  At most ``2 * workers + 1`` groups are read ahead of TensorFlow.  ``workers=0``
    (a loader with ``num_workers=0``) does everything in the calling thread.  The last
    group waits for the loader's pass to end, which is where the loader books it as
    complete (its next epoch).
    """

    def __init__(self, batches: Iterator[Batch], build: Any, n: int, workers: int,
                 bundle: int = 1, error: BaseException | None = None) -> None:
        self.left = n
        self._error = error  # the pass failed to start: the first next() raises it
        staged = workers if n and error is None else 0
        self._stage = OrderedMap(lambda group: (len(group), build(group)),
                                 _Groups(batches, bundle), ahead=2 * staged + 1,
                                 threads=staged, feed=staged > 0,
                                 name=f"{THREAD_PREFIX}-build")

    def _take(self) -> Any:
        """``(batch count, wire parts)`` of the next group, or ``_END`` once the pass is
        over, raising what the pass raised.  Called again only while ``left`` > 0: the end
        and any failure set it to 0."""
        try:
            if self._error is not None:
                raise self._error
            return next(self._stage, _END)
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
        """Stop the feeder and the builders and close the pass (TensorFlow finalized it)."""
        self._stage.close()

