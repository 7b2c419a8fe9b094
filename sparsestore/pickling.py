"""Pickling a loader: its settings and position, the store as what reopens it.

:class:`PicklableLoader` is the half of :class:`~sparsestore.loader.DataLoader` that
crosses process boundaries (torch workers under ``spawn``/``forkserver``):
``__getstate__``/``__setstate__``, :meth:`~PicklableLoader.reopened` (the same round trip
without pickle) and the ``__getattr__`` through which a copy whose store could not be
reopened raises that error on use.  The loader supplies ``__init__``, its settings,
``_share_rows`` and ``_move_to``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .arguments import _check_int
from .errors import InvalidInputError, SparseStoreError
from .store import reopen_at

if TYPE_CHECKING:
    from .backends import Backend
    from .loader import DataLoader
    from .position import Position
    from .store import SparseStore

#: Layout of a pickled loader (see :meth:`DataLoader.__getstate__`).
PICKLE_VERSION = 1


class PicklableLoader:
    """A loader's pickled form: what reopens its store, its settings, seed, shard and
    position; nothing of a pass (threads, caches, buffer pool)."""

    # Supplied by the loader.
    _store: SparseStore
    _options: dict[str, Any]
    _backend: Backend
    _seed: int
    _rank: int
    _world_size: int
    _sub_shards: tuple[tuple[int, int], ...]
    _rank_rows: int
    _epoch: int
    _resume: int | None
    position: Position

    if TYPE_CHECKING:
        def _share_rows(self) -> int: ...
        def _move_to(self, epoch: int) -> None: ...

    def __getstate__(self) -> dict[str, Any]:
        """The settings and position, nothing of a pass (threads, caches, buffer pool).

        The store travels as what reopens it (its path, storage options and the commit
        this handle sees: ``store.reopen_at``'s arguments), reopened in
        :meth:`__setstate__`, so that a copy whose store cannot be reopened still
        unpickles and raises when used: a torch worker then reports the error instead of
        dying before it starts.
        """
        lost = self.__dict__.get("_lost")
        if lost is not None:
            return lost[1]  # a copy that never reopened its store passes its state on
        return {
            "version": PICKLE_VERSION,
            "store": self._store.__reduce__()[1],
            "options": dict(self._options, backend=self._backend),
            "seed": self._seed, "rank": self._rank, "world_size": self._world_size,
            "sub_shards": self._sub_shards, "epoch": self._epoch,
            "batches_consumed": self.position.batches_consumed,
        }

    def reopened(self) -> DataLoader:
        """What a pickle round trip gives, without one: a copy whose store is opened afresh
        by path at this handle's commit (a forked process's open connections to object
        storage belong to its parent), with the settings and the :attr:`position`."""
        other = type(self).__new__(type(self))
        other.__setstate__(self.__getstate__())
        return other

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild from :meth:`__getstate__`: reopen the store, redo the checks, resume."""
        if not isinstance(state, dict) or state.get("version") != PICKLE_VERSION:
            raise InvalidInputError(
                "not a pickled DataLoader of this sparsestore version; pickle it again"
            )
        try:
            store = reopen_at(*state["store"])
        except SparseStoreError as exc:  # replaced, restored to an earlier commit, gone
            self.__dict__["_lost"] = (exc, state)
            return
        self.__init__(store, seed=state["seed"], rank=state["rank"],  # type: ignore[misc]
                      world_size=state["world_size"], **state["options"])
        self._sub_shards = tuple(state.get("sub_shards", ()))
        self._rank_rows = self._share_rows()
        self._move_to(state["epoch"])
        consumed = _check_int(state["batches_consumed"], "batches_consumed", 0)
        self._resume = consumed or None

    def __getattr__(self, name: str) -> Any:
        # Reached only for attributes a loader lacks: those of a copy whose store could
        # not be reopened, which raise the reopening's error on any use.
        lost = self.__dict__.get("_lost")
        if lost is None or not name.startswith("_") or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        exc = lost[0]
        raise type(exc)(f"this DataLoader was unpickled, but its store could not be "
                        f"reopened: {exc}") from exc


__all__ = ["PICKLE_VERSION", "PicklableLoader"]
