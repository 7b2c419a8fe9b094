"""DataLoader: epochs of batches streamed from a store, framework-agnostic.

The loader asks :mod:`sparsestore.sampler` which row blocks this rank reads and in which
order, lets :mod:`sparsestore.reader` decode them in background threads, and cuts batches
out of the decoded units with numpy slicing.  A backend (:mod:`sparsestore.backends`)
turns each compact :class:`Batch` into what the framework wants: scipy CSR for ``numpy``,
``tf.sparse.SparseTensor`` for the TensorFlow adapter; the batches and their numpy half
(``host``) are made on the pass's stage thread (:mod:`sparsestore.engine`), ahead of the
consumer, which only runs the framework half (``wrap``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from .arguments import _check_int
from .backends import Backend, ConvertBackend, get_backend, steps
from .batch import Batch
from .buffers import BufferPool, release_free_heap
from .engine import OrderedMap
from .errors import InvalidInputError
from .explicit_samplers import ExplicitSampling
from .indexing import normalize_rows
from .mixing_check import MixingCheck
from .pickling import PICKLE_VERSION as PICKLE_VERSION  # re-exported: the pickle's layout
from .pickling import PicklableLoader
from .position import POSITION_EVENTS, Position, PositionListener, ResumableState
from .position import STATE_VERSION as STATE_VERSION  # re-exported: the state's schema
from .reader import THREAD_PREFIX, BlockReader, ResidentUnit
from .rows import ColumnSelection
from .sampler import (
    BlockSampler,
    num_batches,
)
from .sharding import ShardedLoader, _ShareSampler
from .sizing import BATCHES_POOLED, MemorySizing, _sequential_block_chunks
from .sizing import SEQUENTIAL_BLOCK_BYTES as SEQUENTIAL_BLOCK_BYTES  # re-exported
from .storage import is_remote
from .store import SparseStore
from .store import open as open_store

#: Decoded rows a shuffled pass holds at once by default: two units of 256 MiB (see
#: ``shuffle_buffer_bytes``).
DEFAULT_SHUFFLE_BUFFER_BYTES = 512 * 2**20
#: On object storage, units (beyond those queued for decoding) whose chunks a pass fetches
#: ahead, so that its round trips overlap: sequential passes only (a shuffled unit is big
#: and is decoded one ahead already).
REMOTE_IO_AHEAD = 4


class DataLoader(ResumableState, ShardedLoader, MemorySizing, ExplicitSampling, MixingCheck,
                 PicklableLoader):
    """Batches of a store for training: shuffled by blocks, sharded by rank, resumable.

    ``for batch in loader`` gives scipy CSR batches (``(X, labels...)`` when ``labels`` is
    given; ndarrays for dense stores) through the ``backend``; :meth:`iter_batches` gives
    the raw :class:`Batch` es adapters build on.  ``shuffle=True`` permutes row blocks
    (one storage chunk each) and then all rows inside a unit of blocks dealt evenly across
    the share, reading each block whole (see :mod:`sparsestore.sampler`).

    ``shuffle_buffer_bytes`` bounds the decoded rows (values, indices and row pointers) a
    shuffled pass holds at once: a unit is half of it, since the pass holds the unit being
    consumed and, with ``num_workers > 0``, the next one decoded ahead (shuffled passes
    decode one unit ahead whatever ``prefetch`` says; a unit is hundreds of batches).  The
    decoded-chunk caches (a few chunks) come on top.  When the rank's whole share fits a
    unit, the epoch is a true permutation; when a unit holds fewer blocks than batches
    need to mix like one, a :class:`~sparsestore.errors.ShuffleQualityWarning` says so
    once.  ``shuffle_buffer_blocks`` instead fixes the number of blocks per unit (memory
    then follows the chunk size).  ``rows``
    restricts the loader to a subset of rows (index array or mask; visited in storage order
    unless shuffled), ``columns`` to a subset of columns (slice, index array or mask;
    batches hold only those, re-indexed).  ``sampler`` / ``batch_sampler`` take torch-style
    iterables of row ids / lists of row ids instead and read them by random access.

    A completed pass advances the epoch by one (so repeated passes reshuffle); call
    :meth:`set_epoch` to choose it; :attr:`position` says where the loader is and
    :meth:`add_position_listener` reports each move.  Ranks get disjoint, near-equal
    shares of the rows (sizes differ by at most one row), so without ``drop_last`` their
    batch counts can differ by one; :meth:`shard` splits a share further (torch workers,
    ``tf.data`` input pipelines).

    A loader pickles (torch workers under ``spawn``/``forkserver``): the store by path at
    its pinned commit, the settings (a ``sampler`` must pickle too), seed, shard and the
    :meth:`state_dict` position, so a copy's next pass yields what
    ``load_state_dict(state_dict())`` would -- the rest of an epoch whose pass is running or
    was broken off -- in threads of its own.  A copy whose store was since saved over or
    restored to an earlier commit raises :class:`~sparsestore.errors.StoreChangedError` when
    used.
    """

    def __init__(
        self,
        store: SparseStore | str | os.PathLike[str],
        batch_size: int = 1024,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
        labels: str | Sequence[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        *,
        sampler: Iterable[int] | None = None,
        batch_sampler: Iterable[Sequence[int]] | None = None,
        rows: Any = None,
        columns: Any = None,
        shuffle_buffer_bytes: int | None = None,
        shuffle_buffer_blocks: int | None = None,
        block_rows: int | None = None,
        block_chunks: int | None = None,
        num_workers: int = 2,
        prefetch: int = 2,
        backend: str | Backend | ConvertBackend = "numpy",
    ) -> None:
        if isinstance(store, (str, os.PathLike)):
            store = open_store(store, mode="r")
        if not isinstance(store, SparseStore):
            raise InvalidInputError(
                f"store must be a SparseStore or a path to one, got {type(store).__name__}"
            )
        self._store = store
        self._batch_size = _check_int(batch_size, "batch_size", 1)
        self._world_size = _check_int(world_size, "world_size", 1)
        self._rank = _check_int(rank, "rank", 0)
        if self._rank >= self._world_size:
            raise InvalidInputError(
                f"rank must be in [0, world_size={self._world_size}), got rank={rank}"
            )
        if not isinstance(shuffle, (bool, np.bool_)) or not isinstance(drop_last, (bool, np.bool_)):
            raise InvalidInputError("shuffle and drop_last must be True or False")
        self._shuffle, self._drop_last = bool(shuffle), bool(drop_last)
        if shuffle_buffer_bytes is not None and shuffle_buffer_blocks is not None:
            raise InvalidInputError(
                "pass shuffle_buffer_bytes (a memory budget) or shuffle_buffer_blocks (a block "
                "count), not both"
            )
        self._buffer_blocks = None if shuffle_buffer_blocks is None else \
            _check_int(shuffle_buffer_blocks, "shuffle_buffer_blocks", 1)
        self._buffer_bytes = None if self._buffer_blocks is not None else _check_int(
            DEFAULT_SHUFFLE_BUFFER_BYTES if shuffle_buffer_bytes is None
            else shuffle_buffer_bytes, "shuffle_buffer_bytes", 2)
        self._block_rows = None if block_rows is None else _check_int(block_rows, "block_rows", 1)
        # Shuffled passes cut the smallest chunk-aligned blocks (more runs per unit, better
        # mixing); sequential ones at least SEQUENTIAL_BLOCK_BYTES of values and two chunks
        # (fewer, larger units to hand between threads, whatever the chunk size).
        self._block_chunks = (1 if shuffle else _sequential_block_chunks(store)) \
            if block_chunks is None else _check_int(block_chunks, "block_chunks", 1)
        self._num_workers = _check_int(num_workers, "num_workers", 0)
        self._prefetch = _check_int(prefetch, "prefetch", 1)
        if sampler is not None and batch_sampler is not None:
            raise InvalidInputError("pass sampler or batch_sampler, not both")
        if (sampler is not None or batch_sampler is not None) and (shuffle or rows is not None):
            raise InvalidInputError(
                "sampler/batch_sampler decide the rows and their order: do not combine them "
                "with shuffle=True or rows=; shuffle inside the sampler instead"
            )
        if batch_sampler is not None and drop_last:
            raise InvalidInputError("drop_last has no effect with batch_sampler; leave it False")
        self._sampler, self._batch_sampler = sampler, batch_sampler
        if seed is None:
            seed = int(np.random.SeedSequence().entropy) % 2**63 if shuffle else 0
        self._seed = _check_int(seed, "seed", 0)
        self._label_names = store.labels.select(labels)
        self._rows = self._check_rows(rows)
        self._columns = ColumnSelection.build(columns, store.n_cols)
        self._backend = get_backend(backend)
        self._sub_shards: tuple[tuple[int, int], ...] = ()
        self._rank_rows = self._share_rows()
        # (bounds, bytes per block), shared with with_shard() copies; filled lazily
        # (bounds, bytes per block, indptr's chunks), shared with with_shard() copies
        self._bounds: list[tuple[np.ndarray, np.ndarray | None, list[np.ndarray] | None]] = []
        self._warned = False
        self._block_sampler: BlockSampler | None = None
        self._epoch = 0
        self._consumed = 0
        self._resume: int | None = None
        self._listeners: list[PositionListener] = []
        self._last_reader: BlockReader | None = None
        # A shuffled share that fits one unit stays decoded between passes (see reader.py).
        self._resident = ResidentUnit()
        # Decoded chunks and blocks reuse this memory pass after pass (see buffers.py).
        # All of it may wait idle between passes: a pass ends with everything it held idle,
        # and releasing the excess (oldest first: a shuffled unit's blocks) only made the
        # next pass allocate and page-fault it again.
        pooled = self._working_set_bytes() + BATCHES_POOLED * self._batch_bytes()
        self._pool = BufferPool(max_free=4096, max_bytes=pooled)
        self._options = dict(
            batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, labels=labels,
            sampler=sampler, batch_sampler=batch_sampler, rows=rows, columns=columns,
            shuffle_buffer_bytes=shuffle_buffer_bytes,
            shuffle_buffer_blocks=shuffle_buffer_blocks, block_rows=block_rows,
            block_chunks=block_chunks, num_workers=num_workers, prefetch=prefetch,
            backend=self._backend,
        )

    # ------------------------------------------------------------ validation
    def _check_rows(self, rows: Any) -> np.ndarray | None:
        if rows is None:
            return None
        n = self._store.n_rows
        sel = normalize_rows(rows, n)
        if isinstance(sel, slice):
            sel = np.arange(n, dtype=np.int64)[sel]
        elif isinstance(sel, (int, np.integer)):
            sel = np.array([int(sel)], dtype=np.int64)
        uniq = np.unique(sel)
        if uniq.size != sel.size:
            raise InvalidInputError(
                "rows contains duplicates; a row subset lists each row once (use sampler= to "
                "repeat rows)"
            )
        return uniq

    # ------------------------------------------------------------ properties
    @property
    def store(self) -> SparseStore:
        return self._store

    @property
    def n_cols(self) -> int:
        """Columns of the batches (after any column subset)."""
        return self._store.n_cols if self._columns is None else self._columns.n_cols

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def num_workers(self) -> int:
        """Background decode threads per pass (0: decode in the consuming thread)."""
        return self._num_workers

    @property
    def label_names(self) -> tuple[str, ...]:
        return self._label_names

    @property
    def label_specs(self) -> tuple[tuple[str, np.dtype, tuple[int, ...]], ...]:
        """``(name, dtype, per-row shape)`` of each requested label."""
        out = []
        for name in self._label_names:
            lab = self._store.labels[name]
            out.append((name, lab.dtype, tuple(int(s) for s in lab.shape[1:])))
        return tuple(out)

    @property
    def is_dense(self) -> bool:
        return self._store.is_dense

    @property
    def dtype(self) -> np.dtype:
        return self._store.dtype

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> Position:
        """The epoch and the batches read of it (see :class:`Position`); read-only: move
        the loader with :meth:`set_epoch` or :meth:`load_state_dict`."""
        consumed = self._resume if self._resume is not None else self._consumed
        return Position(self._epoch, int(consumed))

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def sub_shards(self) -> tuple[tuple[int, int], ...]:
        """``(index, count)`` of each :meth:`shard` call this loader came from, outermost
        first (empty for a loader reading its rank's whole share)."""
        return self._sub_shards

    @property
    def shuffle(self) -> bool:
        return self._shuffle

    @property
    def drop_last(self) -> bool:
        return self._drop_last

    @property
    def backend(self) -> Backend | ConvertBackend:
        return self._backend

    @property
    def num_rows(self) -> int | None:
        """Rows this rank yields per epoch (after ``drop_last``); None with a
        ``batch_sampler``, whose batch sizes are known only by iterating it (a pass)."""
        if self._batch_sampler is not None:
            return None
        if self._is_explicit:
            return self._sampler_num_rows()
        if self._drop_last:
            return len(self) * self._batch_size
        return self._rank_rows

    @property
    def decoded_chunks(self) -> dict[str, int]:
        """Storage chunks decoded by the latest pass, per array (empty before any pass)."""
        return {} if self._last_reader is None else self._last_reader.decoded_chunks()

    @property
    def _is_explicit(self) -> bool:
        return self._sampler is not None or self._batch_sampler is not None

    # ------------------------------------------------------------ epochs
    def __len__(self) -> int:
        if self._is_explicit:
            total = self._explicit_total_batches()
            r, w = self._slot()
            return max(0, -(-(total - r) // w))
        return num_batches(self._rank_rows, self._batch_size, self._drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch of the next pass (its shuffle order); forwards to samplers."""
        self._move_to(epoch)
        self._notify("set_epoch")

    def _move_to(self, epoch: int) -> None:
        epoch = _check_int(epoch, "epoch", 0)
        if epoch != self._epoch:
            self._resume = None
        self._epoch = epoch
        for s in (self._sampler, self._batch_sampler):
            if s is not None and hasattr(s, "set_epoch"):
                s.set_epoch(epoch)

    def with_shard(self, rank: int, world_size: int) -> DataLoader:
        """A loader with the same settings and seed reading rank ``rank`` of ``world_size``
        (its whole share: no sub-shard), at this loader's epoch, from the epoch's start."""
        other = DataLoader(self._store, seed=self._seed, rank=rank, world_size=world_size,
                           **self._options)
        other._bounds = self._bounds  # block boundaries do not depend on the shard
        other._epoch = self._epoch
        return other

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Any]:
        return self.iter_converted()

    def iter_converted(self, backend: str | Backend | ConvertBackend | None = None, *,
                       prefetch: int | None = None, threads: int | None = None
                       ) -> Iterator[Any]:
        """One pass through ``backend`` (default: the loader's): what ``for x in loader``
        gives, each batch's ``host`` step run off this thread and its ``wrap`` step here.

        The pass runs on a stage (:class:`~sparsestore.engine.OrderedMap`) up to
        ``prefetch`` batches (default: the loader's) ahead of the consumer: with
        ``threads=1`` (the default) one thread cuts the batches (gathering shuffled rows)
        and runs ``host`` on each, so the consumer's thread only wraps them; with more, that
        thread hands the batches to ``threads`` host threads; with ``threads=0`` (the
        default when ``num_workers=0``) everything runs here, batch by batch.  The
        position counts the batches handed to the consumer, not those made ahead; the
        threads stop with the pass.
        """
        be = self._backend if backend is None else get_backend(backend)
        ahead = self._prefetch if prefetch is None else _check_int(prefetch, "prefetch", 1)
        threads = (1 if self._num_workers else 0) if threads is None else \
            _check_int(threads, "threads", 0)
        host, wrap = steps(be)
        if host is None:  # a convert-only backend: wrap the raw batch in the consumer
            return self._pass(lambda batches: (wrap(b, self) for b in batches))

        def staged(batches: Iterator[Batch]) -> Iterator[Any]:
            stage = OrderedMap(lambda b: host(b, self), batches, ahead=ahead,
                               threads=threads if threads > 1 else 0, feed=threads > 0,
                               name=f"{THREAD_PREFIX}-host")
            try:
                for parts in stage:
                    yield wrap(parts, self)
            finally:
                stage.close()  # joins the stage's threads, which close the pass

        return self._pass(staged)

    def iter_batches(self) -> Iterator[Batch]:
        """One pass (the rest of the epoch after :meth:`load_state_dict`) of raw batches."""
        return self._pass(None)

    def _pass(self, convert: Callable[[Iterator[Batch]], Iterator[Any]] | None
              ) -> Iterator[Any]:
        """One pass of batches, through ``convert`` when given: the position counts what is
        handed out here, and the epoch moves on only once all of it was."""
        start = self._resume if self._resume is not None else 0
        self._resume = None
        epoch = self._epoch
        self._consumed = start
        # A shuffled unit is half the byte budget, a sampler's holds several batches: one
        # unit is consumed while one is decoded.
        big = self._is_explicit or (self._shuffle and self._buffer_bytes is not None)
        ahead = 1 if big else self._prefetch
        reader = BlockReader(
            self._store, label_names=self._label_names, columns=self._columns,
            num_workers=self._num_workers, prefetch=ahead,
            piece_rows=None if self._is_explicit else self._batch_size, pool=self._pool,
            unit_nnz=self._unit_nnz(),
            io_ahead=REMOTE_IO_AHEAD if is_remote(self._store.path) and not big else 0,
        )
        self._last_reader = reader
        if not self._is_explicit and start < len(self):
            # Planned here, in the consumer's thread, whichever thread runs the pass: its
            # errors and its poor-mixing warning reach the caller's line.
            self._sampler_for_blocks()
        gen = self._explicit_pass(reader, start) if self._is_explicit else \
            self._block_pass(reader, epoch, start)
        items: Iterator[Any] = gen if convert is None else convert(gen)
        try:
            for item in items:
                self._consumed += 1
                yield item
        finally:
            items.close()  # type: ignore[attr-defined]  # joins the pass's threads
            gen.close()
            release_free_heap()
        self._epoch = epoch + 1
        self._consumed = 0
        self._notify("epoch_end")

    def _sampler_for_blocks(self) -> BlockSampler:
        if self._block_sampler is None:
            if not self._bounds:
                self._bounds.append(self._plan_bounds())
            self._block_sampler = self._share_sampler(self._unit_bytes)
            self._warn_if_poorly_mixed(self._block_sampler)
        return self._block_sampler

    def _share_sampler(self, unit_bytes: int | None) -> _ShareSampler:
        bounds, nbytes, _ = self._bounds[0]
        return _ShareSampler(
            bounds, sub_shards=self._sub_shards, batch_size=self._batch_size,
            rows=self._rows, shuffle=self._shuffle, seed=self._seed,
            buffer_blocks=self._buffer_blocks or 1,
            unit_bytes=None if nbytes is None else unit_bytes,
            block_bytes=nbytes, rank=self._rank, world_size=self._world_size,
        )

    def _block_pass(self, reader: BlockReader, epoch: int, start: int) -> Iterator[Batch]:
        bs, total = self._batch_size, len(self)
        if start >= total:
            return
        # Its first batch is a unit of its own: the pass starts without waiting for a block.
        plan = self._sampler_for_blocks().plan(epoch, head_rows=bs)
        reader.seed_row_pointers(self._bounds[0][2])
        u0, off = plan.locate(start * bs)
        if self._shuffle and self._buffer_bytes is not None and plan.n_units == 1:
            reader.resident = self._resident
        else:
            self._resident.clear()
        if self._shuffle and plan.n_units - u0 > 1:
            spans = [plan.spans(u) for u in range(u0, plan.n_units)]
            if all(sp is not None for sp in spans):
                reader.keep_seams(spans)
        emitted = start
        carry: list[Batch] = []
        carried = 0
        stream = reader.stream(plan.units(u0))
        try:
            for pieces in stream:
                for piece in pieces:
                    n = piece.n_rows
                    if off:  # resuming: skip whole pieces (the skip ends on the batch grid)
                        off -= n
                        continue
                    if carried == 0 and n == bs:
                        emitted += 1
                        yield piece
                    else:  # a piece at a unit boundary: pieces never straddle batches
                        carry.append(piece)
                        carried += n
                        if carried == bs:
                            emitted += 1
                            yield Batch.concat(carry, self._pool)
                            carry, carried = [], 0
                    if emitted >= total:
                        return
            if carried and emitted < total:
                yield Batch.concat(carry, self._pool)
        finally:
            stream.close()

    def __repr__(self) -> str:
        if "_lost" in self.__dict__:
            return f"<DataLoader whose store could not be reopened: {self._lost[0]}>"
        return (
            f"<DataLoader {self._store.path!r} batch_size={self._batch_size} "
            f"shuffle={self._shuffle} rank={self._rank}/{self._world_size} "
            f"{''.join(f'shard={i}/{n} ' for i, n in self._sub_shards)}"
            f"epoch={self._epoch} batches={len(self)}>"
        )

    def epoch_rows(self, epoch: int | None = None) -> np.ndarray:
        """The row ids this rank serves in ``epoch`` (default: the next pass's), in order.

        Index math only (block order, rank shard, buffer permutations; ``indptr`` for the
        block bounds): no data chunk is read, so shuffle quality can be measured cheaply.
        Batches are consecutive ``batch_size`` slices of it (``drop_last`` applied).  With
        ``sampler``/``batch_sampler`` it is the sampler's order, iterated once now at the
        loader's current epoch (a one-shot iterator is consumed; another epoch is refused).
        """
        if self._is_explicit:
            if epoch is not None and _check_int(epoch, "epoch", 0) != self._epoch:
                raise InvalidInputError(
                    f"a sampler's order is known only for the current epoch ({self._epoch}); "
                    f"call set_epoch({epoch}) first"
                )
            parts = list(self._rank_row_batches())
        else:
            epoch = self._epoch if epoch is None else _check_int(epoch, "epoch", 0)
            plan = self._sampler_for_blocks().plan(epoch)
            parts = [unit.rows for unit in plan.units()]
        rows = np.concatenate(parts).astype(np.int64, copy=False) if parts else \
            np.zeros(0, np.int64)
        if self._drop_last and not self._is_explicit:
            rows = rows[: len(self) * self._batch_size]
        return rows


__all__ = ["POSITION_EVENTS", "Batch", "DataLoader", "Position", "PositionListener"]
