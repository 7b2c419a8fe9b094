"""PyTorch backend: a :class:`sparsestore.DataLoader` as torch sparse tensors and datasets.

``DataLoader(store, backend="torch")`` yields ``torch.sparse_csr_tensor`` batches
``[batch, n_cols]`` (``TorchBackend(layout="coo")``: coalesced ``sparse_coo_tensor``; dense
tensors for dense stores) and labels as tensors, as ``(x, labels...)`` with labels.  The
backend's ``host`` step (on the loader's stage thread, ahead of the consumer) casts the
index arrays to int64 and writes COO coordinates with :func:`sparsestore.kernels.coo_into`;
its ``wrap`` step only wraps those arrays (``torch.from_numpy``: the tensors share their
memory, no copy).

:class:`SparseIterableDataset` plugs a loader into ``torch.utils.data.DataLoader``:

    import sparsestore.adapters.torch as sstorch
    ds = sstorch.SparseIterableDataset(sparsestore.DataLoader(store, 512, shuffle=True,
                                                              labels="y", seed=0))
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2,
                                     pin_memory=torch.accelerator.is_available())
    for epoch in range(3):
        ds.set_epoch(epoch)
        for x, y in dl:   # x: sparse CSR [512, n_cols], y: tensor
            ...

Each torch worker reads its own disjoint share of the loader's (rank's) rows
(``loader.shard(worker, k)``), so workers never overlap and together read every row of
the rank once.  Any start method works (``fork``, ``spawn``, ``forkserver``, Python
3.14's default on Linux): the dataset pickles, its loader carrying the store by path at
its pinned commit and its settings, never its threads; a worker whose store was replaced
or restored to an earlier commit raises ``StoreChangedError``.  Pin memory only where an
accelerator exists (elsewhere torch warns it has nothing to pin).
:class:`SparseMapDataset` is a map-style view (``__getitems__`` reads a whole batch of row
ids at once) for torch samplers; it pickles too.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.data as tud

from sparsestore.backends import TwoStepBackend
from sparsestore.errors import DTypeError, InvalidInputError
from sparsestore.kernels import coo_into
from sparsestore.loader import DataLoader
from sparsestore.sharding import taken_in_turn
from sparsestore.storage import is_remote

if TYPE_CHECKING:
    from sparsestore.loader import Batch
    from sparsestore.store import SparseStore

__all__ = ["SparseIterableDataset", "SparseMapDataset", "TorchBackend", "collate_batches",
           "distributed_shard", "to_torch"]

LAYOUTS = ("csr", "coo")
STATE_VERSION = 1
_END = object()  # a shard's pass ran out

# torch warns once per process that CSR support is "beta"; the adapter uses only its
# construction, to_dense, pinning and matmul, which are stable.  Batches crossing from
# worker processes are rebuilt without invariant checks (the reader guarantees them).
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled",
                        module="torch.multiprocessing.reductions")
# JAX, once imported, warns at every os.fork() that a forked child calling JAX may deadlock;
# the torch workers forked here run only numpy and torch.
warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)


def _ready(a: np.ndarray, what: str, dtype: Any = None) -> np.ndarray:
    """``a`` (cast to ``dtype``) as an array ``torch.from_numpy`` takes as it is: numeric,
    writeable, C-contiguous (a copy only where it is not)."""
    a = np.asarray(a, dtype=dtype)
    if a.dtype.kind not in "biuf":
        raise DTypeError(f"{what} has dtype {a.dtype}, which torch cannot hold; store it numeric")
    if not a.flags.writeable or not a.flags.c_contiguous:  # from_numpy warns on read-only
        a = np.ascontiguousarray(a).copy()
    return a


def _layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _host_x(dense: Any, values: Any, indices: Any, row_splits: Any,
            layout: str) -> tuple[np.ndarray, ...]:
    """x's arrays as torch holds them: a dense block, or a CSR tensor's values, int64
    column ids and row pointers, or a COO tensor's values and ``(2, nnz)`` int64
    coordinates (by ``coo_into``)."""
    if dense is not None:
        return (_ready(dense, "the store"),)
    vals = _ready(values, "the store")
    if layout == "csr":
        return vals, _ready(indices, "indices", np.int64), _ready(row_splits, "indptr", np.int64)
    coords = np.empty((2, vals.size), dtype=np.int64)
    coo_into(np.asarray(row_splits, dtype=np.int64), indices, coords.T, wait=True)
    return vals, coords


def _wrap_x(arrays: tuple[np.ndarray, ...], shape: tuple[int, int],
            layout: str) -> torch.Tensor:
    """The tensor over :func:`_host_x`'s arrays, sharing their memory."""
    tensors = [torch.from_numpy(a) for a in arrays]
    if len(tensors) == 1:
        return tensors[0]
    if layout == "csr":
        vals, col, crow = tensors
        return torch.sparse_csr_tensor(crow, col, vals, size=shape, check_invariants=False)
    vals, coords = tensors
    # Canonical rows (sorted, unique column ids) make row-major COO already coalesced.
    return torch.sparse_coo_tensor(coords, vals, size=shape, is_coalesced=True,
                                   check_invariants=False)


def to_torch(batch: Batch, layout: str = "csr") -> Any:
    """One raw loader batch as a torch tensor (its labels not included)."""
    return _wrap_x(_host_x(batch.dense, batch.values, batch.indices, batch.row_splits, layout),
                   (batch.n_rows, batch.n_cols), layout)


class HostBatch(NamedTuple):
    """What :meth:`TorchBackend.host` gives: x's arrays (:func:`_host_x`), x's shape and
    the label arrays, all ready for ``from_numpy``."""

    x: tuple[np.ndarray, ...]
    shape: tuple[int, int]
    labels: tuple[np.ndarray, ...]


class TorchBackend(TwoStepBackend):
    """``DataLoader(store, backend="torch")``: sparse CSR (or COO) batches, labels as tensors."""

    name = "torch"

    def __init__(self, layout: str = "csr") -> None:
        self.layout = _layout(layout)

    def host(self, batch: Batch, loader: DataLoader) -> HostBatch:
        """The batch's arrays as torch will hold them (int64 indices, COO coordinates)."""
        x = _host_x(batch.dense, batch.values, batch.indices, batch.row_splits, self.layout)
        labels = tuple(_ready(lab, f"label {name!r}")
                       for lab, name in zip(batch.labels, loader.label_names, strict=True))
        return HostBatch(x, (batch.n_rows, batch.n_cols), labels)

    def wrap(self, parts: HostBatch, loader: DataLoader) -> Any:
        """Tensors over the host arrays (no copy): ``x`` or ``(x, labels...)``."""
        x = _wrap_x(parts.x, parts.shape, self.layout)
        return (x, *map(torch.from_numpy, parts.labels)) if parts.labels else x

    def __repr__(self) -> str:
        return f"TorchBackend(layout={self.layout!r})"


def distributed_shard(loader: DataLoader, rank: int | None = None,
                      world_size: int | None = None) -> DataLoader:
    """The loader's rows for this process of a ``torch.distributed`` job.

    Like torch's ``DistributedSampler``: ``rank`` and ``world_size`` default to
    ``torch.distributed``'s when a process group is initialised, so a script launched by
    ``torchrun`` reads a disjoint share of the rows on each rank without passing them.
    Defaults never override a loader the caller already sharded (``world_size > 1``), and
    without a process group the loader is returned unchanged.  Explicit values replace the
    loader's own shard (same settings and seed, through ``loader.with_shard``).
    """
    if rank is None and world_size is None:
        if loader.world_size > 1 or not (dist.is_available() and dist.is_initialized()):
            return loader
        rank, world_size = dist.get_rank(), dist.get_world_size()
    elif rank is None or world_size is None:
        raise InvalidInputError("pass both rank and world_size, or neither")
    if (int(rank), int(world_size)) == (loader.rank, loader.world_size):
        return loader
    return loader.with_shard(int(rank), int(world_size))


class SparseIterableDataset(tud.IterableDataset):
    """A loader as a torch ``IterableDataset``: use ``DataLoader(ds, batch_size=None)``.

    Yields what the loader's torch backend gives (a ``TorchBackend(layout)`` unless the
    loader already has one).  With ``num_workers=k`` each worker iterates a copy of the
    loader restricted to its share of the rows; worker copies cannot advance the epoch
    here, so call :meth:`set_epoch` before each epoch (as with torch's
    ``DistributedSampler``).  ``num_workers=k`` (constructor argument, ``0`` by default)
    cuts the rank's rows into ``k`` shards (``loader.shard``); give torch's ``DataLoader``
    the same ``num_workers`` so each worker reads one.  ``len(ds)`` is ``len(loader)``,
    which the ``k`` shards' batches add up to, and what torch delivers whatever its
    ``num_workers``: a process holding several shards (torch run with fewer workers, or
    none, as Keras's default is) reads them in turn, without workers in the order ``k``
    workers would deliver them.  Worker copies start the epoch at the dataset's position
    (:meth:`load_state_dict`), whatever pass the loader itself has in progress, under
    every start method alike.

    Under ``torch.distributed`` (``torchrun``) a loader built without ``rank`` /
    ``world_size`` is sharded by the process group's rank and size, as torch's
    ``DistributedSampler`` does (see :func:`distributed_shard`; pass ``rank`` and
    ``world_size`` here to choose them yourself).  Initialise the process group before
    building the dataset.
    """

    def __init__(self, loader: DataLoader, layout: str | None = None,
                 num_workers: int = 0, *, rank: int | None = None,
                 world_size: int | None = None) -> None:
        if not isinstance(loader, DataLoader):
            raise InvalidInputError("expected a sparsestore.DataLoader, got "
                                    f"{type(loader).__name__}")
        super().__init__()
        self.loader = distributed_shard(loader, rank, world_size)
        own = loader.backend
        self.backend = TorchBackend(layout) if layout else \
            own if isinstance(own, TorchBackend) else TorchBackend()
        self.num_workers = int(num_workers)
        self._seen = 0
        self._resume: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.loader)  # loader.shard cuts on the batch grid: the shards add up

    def set_epoch(self, epoch: int) -> None:
        """Choose the next epoch (its shuffle order) for this process and future workers."""
        self.loader.set_epoch(epoch)
        self._resume = None
        self._seen = 0

    def __iter__(self) -> Iterator[Any]:
        info = tud.get_worker_info()
        t, w = (1, 0) if info is None else (info.num_workers, info.id)
        k = max(1, self.num_workers)
        state, seen = self._resume, 0
        if state is not None:
            if state["num_workers"] != k or t not in (1, k):
                raise InvalidInputError(
                    f"state was saved with num_workers={state['num_workers']} and this "
                    f"dataset has num_workers={k}, read by {t} torch worker(s); resume with "
                    f"the dataset's num_workers and the same number of torch workers (or none)"
                )
            seen = int(state["batches_seen"])
            if info is None:
                self._resume = None  # used up here; worker copies drop theirs with them
        # k shards whatever torch runs (so len(self) holds), dealt to the workers from
        # shard seen % k on: torch takes a batch from workers 0, 1, ... in turn.  A process
        # holding several reads them in turn too, in the order k workers deliver them.
        mine = [(seen + i) % k for i in range(k)][w::t]
        done = None if state is None else \
            taken_in_turn([len(self.loader.shard(i, k)) for i in range(k)], seen)
        streams = []
        try:
            for shard in mine:
                # A worker reads a fresh copy even of a single shard: a forked worker's
                # loader would start its epoch afresh, a pickled one where its pass had got to.
                loader = self.loader if k == 1 and info is None else self.loader.shard(shard, k)
                if info is not None and is_remote(loader.store.path):
                    # A forked worker's inherited connections to object storage belong to
                    # the parent's event loop: reopen by path at the pinned commit, as spawn.
                    loader = loader.reopened()
                if done is not None:
                    inner = loader.state_dict()
                    inner.update(epoch=state["epoch"], seed=state["seed"],
                                 batches_consumed=done[shard])
                    loader.load_state_dict(inner)
                streams.append(loader.iter_converted(self.backend))  # host on its stage
            self._seen = seen
            turn = deque(streams)  # one batch from each shard in turn, until it runs out
            while turn:
                stream = turn.popleft()
                if (item := next(stream, _END)) is not _END:
                    turn.append(stream)
                    self._seen += 1
                    yield item
        finally:
            for stream in streams:
                stream.close()
        if info is None and k > 1:
            # Shard copies advance only themselves; a whole pass read here moves this
            # loader on, as a pass of an unsharded loader does.
            self.loader.set_epoch(self.loader.epoch + 1)
        self._seen = 0  # a completed pass: the loaders moved on to the next epoch

    def state_dict(self, batches_seen: int | None = None, num_workers: int | None = None
                   ) -> dict[str, Any]:
        """Where the epoch is; :meth:`load_state_dict` then yields exactly the rest.

        Without workers the dataset counts the batches itself.  With ``num_workers=k``
        only the consumer knows how many arrived: pass ``batches_seen``, the epoch's
        batches received so far (those before a resume included).  torch takes batches
        from the workers in turn, so each worker's position, and which worker must go
        first to keep the order, follow from it.
        """
        k = max(1, self.num_workers if num_workers is None else int(num_workers))
        seen = self._seen if batches_seen is None else int(batches_seen)
        return {"version": STATE_VERSION, "epoch": self.loader.epoch, "seed": self.loader.seed,
                "batches_seen": seen, "num_workers": k}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration (in every worker) skips what was already delivered.

        With workers it applies to every iteration until :meth:`set_epoch` is called.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise InvalidInputError("not a SparseIterableDataset state")
        self.loader.set_epoch(int(state["epoch"]))
        self._resume = dict(state)


class SparseMapDataset(tud.Dataset):
    """Map-style rows of a store: ``ds[i]`` one row, ``__getitems__(ids)`` a whole batch.

    With ``torch.utils.data.DataLoader(ds, batch_size=B, sampler=..., collate_fn=
    collate_batches)`` each batch is one random-access read of the store (``store[ids]``)
    turned into a sparse tensor (and label tensors): any torch sampler works.
    """

    def __init__(self, store: SparseStore, labels: str | Sequence[str] | None = None,
                 layout: str = "csr") -> None:
        self.store, self.layout = store, _layout(layout)
        self.label_names = store.labels.select(labels)

    def __len__(self) -> int:
        return int(self.store.n_rows)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> Any:
        ids = np.asarray(indices, dtype=np.int64)
        labels = [torch.from_numpy(_ready(self.store.labels[n][ids], f"label {n!r}"))
                  for n in self.label_names]
        X = self.store[ids]
        parts = (X, None, None, None) if self.store.is_dense else \
            (None, X.data, X.indices, X.indptr)
        x = _wrap_x(_host_x(*parts, self.layout), (ids.size, int(self.store.n_cols)),
                    self.layout)
        return (x, *labels) if labels else x


def collate_batches(batch: Any) -> Any:
    """``collate_fn`` for :class:`SparseMapDataset`: its batches arrive already assembled."""
    return batch
