"""Where a loader is in its stream, and the resumable state that records it.

:class:`Position` is the epoch and the batches of it already read; position listeners
hear of each move.  :class:`ResumableState` is the half of
:class:`~sparsestore.loader.DataLoader` that saves and checks that position:
:meth:`~ResumableState.state_dict` (its schema, ``STATE_VERSION``, and the plan a shuffled
epoch's order depends on) and :meth:`~ResumableState.load_state_dict`.  The loader
supplies its settings (``_batch_size``, ``_shuffle``, ...), ``_move_to``,
``_sampler_for_blocks`` and ``__len__``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .arguments import _check_int
from .errors import InvalidInputError

if TYPE_CHECKING:
    from .sampler import BlockSampler

STATE_VERSION = 1


@dataclass(frozen=True)
class Position:
    """Where a loader is in its stream: the epoch and the batches of it already read.

    ``epoch`` is the epoch of the pass in progress, or of the next pass when none is
    (a completed pass moves it on by one and ``batches_consumed`` back to 0);
    ``batches_consumed`` counts the batches this loader has handed out in that epoch,
    including those an adapter has read ahead of its consumer, or the batches a
    :meth:`DataLoader.load_state_dict` skips.  The same two numbers as
    :meth:`DataLoader.state_dict`'s ``epoch`` and ``batches_consumed``.
    """

    epoch: int
    batches_consumed: int


#: What a position listener is told: ``"set_epoch"`` and ``"load_state_dict"`` (someone
#: chose the position), ``"epoch_end"`` (a pass ran to its end and moved the epoch on).
POSITION_EVENTS = ("set_epoch", "load_state_dict", "epoch_end")
PositionListener = Callable[[str, Position], None]


class ResumableState:
    """A loader's position: listeners told of its moves, :meth:`state_dict` and
    :meth:`load_state_dict` (the settings a position is only meaningful under, checked)."""

    # Supplied by the loader.
    _seed: int
    _batch_size: int
    _shuffle: bool
    _drop_last: bool
    _rank: int
    _world_size: int
    _sub_shards: tuple[tuple[int, int], ...]
    _rank_rows: int
    _buffer_blocks: int | None
    _buffer_bytes: int | None
    _block_sampler: BlockSampler | None
    _listeners: list[PositionListener]
    _resume: int | None
    _is_explicit: bool
    position: Position

    if TYPE_CHECKING:
        def __len__(self) -> int: ...
        def _move_to(self, epoch: int) -> None: ...
        def _sampler_for_blocks(self) -> BlockSampler: ...

    def add_position_listener(self, listener: PositionListener) -> None:
        """Call ``listener(event, position)`` whenever this loader's position moves.

        ``event`` is one of :data:`POSITION_EVENTS`: ``"set_epoch"`` and
        ``"load_state_dict"`` after those calls (even one to the epoch the loader already
        has), ``"epoch_end"`` when a pass has run to its end and the epoch moved on;
        ``position`` is the new :attr:`position`.  How an adapter that starts passes on its
        own (a new epoch per ``tf.data`` iterator) learns that its user chose the epoch,
        without wrapping the loader's methods.  Listeners run in the thread that moved the
        loader, in the order added; they belong to this object only (copies from
        :meth:`shard`, :meth:`with_shard` or pickling start without any) and are held
        strongly, so hold in them nothing that must die before the loader.
        """
        if not callable(listener):
            raise InvalidInputError(f"a position listener must be callable, got {listener!r}")
        self._listeners.append(listener)

    def remove_position_listener(self, listener: PositionListener) -> None:
        """Stop calling ``listener`` (added by :meth:`add_position_listener`)."""
        try:
            self._listeners.remove(listener)
        except ValueError:
            raise InvalidInputError(f"{listener!r} is not a listener of this loader") from None

    def _notify(self, event: str) -> None:
        if self._listeners:
            pos = self.position
            for listener in list(self._listeners):
                listener(event, pos)

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is, as a JSON-serialisable dict; :meth:`load_state_dict` resumes it.

        Keys (``STATE_VERSION`` 1; new keys may be added, none removed or changed):

        * ``version`` (int): the layout of this dict, ``1``.
        * ``epoch`` (int), ``batches_consumed`` (int): the :attr:`position`.
        * ``seed`` (int): the shuffle seed (restored by :meth:`load_state_dict`).
        * ``batch_size`` (int), ``shuffle`` (bool), ``drop_last`` (bool), ``world_size``
          (int): settings the position is only meaningful under; a loader whose settings
          differ refuses the state.
        * ``rank`` (int): informational, not checked.
        * ``sub_shards`` (list of ``[index, count]`` pairs): the :attr:`sub_shards`; a
          loader reading another sub-shard refuses the state (absent from states saved
          before sub-shards existed: the ``num_rows`` check stands in).
        * ``num_rows`` (int, or ``None`` with ``sampler``/``batch_sampler``): the rows of
          this loader's share per epoch, checked on load (a changed store or row subset
          is refused).
        * ``batches_per_epoch`` (int): ``len(loader)``, informational.
        * ``plan`` (dict or ``None``): what a shuffled epoch's order depends on beyond seed
          and epoch (the row blocks, the shuffle buffer), checked on load; ``None`` when
          the order is the rows' own.

        Resuming guarantees that the loaded loader's next pass yields exactly the batches
        of the epoch that follow the first ``batches_consumed`` ones, in the same order and
        with the same rows, as the uninterrupted pass would have; later epochs then follow
        as usual.  Batches read ahead by an adapter (prefetched, not yet trained on) are
        counted as consumed, so a checkpoint taken mid-epoch skips those on resume.
        """
        pos = self.position
        return {
            "version": STATE_VERSION,
            "epoch": pos.epoch,
            "seed": self._seed,
            "batches_consumed": pos.batches_consumed,
            "batch_size": self._batch_size,
            "shuffle": self._shuffle,
            "drop_last": self._drop_last,
            "rank": self._rank,
            "world_size": self._world_size,
            "sub_shards": [list(p) for p in self._sub_shards],
            "num_rows": self._rank_rows if not self._is_explicit else None,
            "batches_per_epoch": len(self),
            "plan": self._plan_record(),
        }

    def _plan_record(self) -> dict[str, Any] | None:
        """What a shuffled epoch's order depends on beyond the seed and epoch: the blocks
        (in the rows' positions; a store saved with another chunk size, or block options,
        cut others) and the shuffle buffer.  Rank-independent, so one rank's checkpoint
        resumes every rank.  ``None`` when the order is the rows' own (unshuffled, or a
        torch-style sampler): any blocks then serve the same rows in the same order."""
        if self._is_explicit or not self._shuffle:
            return None
        bs = self._sampler_for_blocks()
        h = hashlib.sha256()
        h.update(bs.starts.astype("<i8").tobytes())
        h.update(bs.ends.astype("<i8").tobytes())
        return {"blocks": bs.n_blocks, "blocks_digest": h.hexdigest()[:32],
                "shuffle_buffer_blocks": self._buffer_blocks,
                "shuffle_buffer_bytes": self._buffer_bytes}

    def _check_plan(self, saved: Any) -> None:
        """Refuse a state whose epoch was planned over other blocks or another buffer: its
        ``batches_consumed`` would point into another order (rows served twice, others never)."""
        mine = self._plan_record()
        if saved == mine:
            return
        if not isinstance(saved, dict):
            raise InvalidInputError(f"not a DataLoader state: bad 'plan' entry {saved!r}")
        if mine is not None:
            for key in ("shuffle_buffer_blocks", "shuffle_buffer_bytes"):
                if saved.get(key) != mine[key]:
                    raise InvalidInputError(
                        f"state was saved with {key}={saved.get(key)!r} but this loader has "
                        f"{mine[key]!r}; build the loader with the same settings"
                    )
        cuts = "no" if mine is None else f"{mine['blocks']} (other)"
        raise InvalidInputError(
            f"state was saved for a shuffled epoch over {saved.get('blocks')!r} row blocks, "
            f"this loader cuts {cuts} blocks: the store was saved again with another chunk "
            "size (or rows were appended, or block_rows/block_chunks changed), so the epoch's "
            "order differs and resuming would serve some rows twice and skip others; resume "
            "over the store the state was saved on, with the same loader settings, or start "
            "the epoch afresh"
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next pass yields exactly the remaining batches."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise InvalidInputError(
                f"not a DataLoader state (expected a dict with version={STATE_VERSION})"
            )
        for key in ("batch_size", "shuffle", "drop_last", "world_size"):
            if state.get(key) != getattr(self, f"_{key}"):
                raise InvalidInputError(
                    f"state was saved with {key}={state.get(key)!r} but this loader has "
                    f"{key}={getattr(self, f'_{key}')!r}; build the loader with the same settings"
                )
        if "sub_shards" in state and [tuple(p) for p in state["sub_shards"]] != \
                list(self._sub_shards):
            raise InvalidInputError(
                f"state was saved by sub-shard {state['sub_shards']!r} but this loader reads "
                f"{[list(p) for p in self._sub_shards]!r}; load it into the same shard(i, n)"
            )
        if not self._is_explicit and state.get("num_rows") != self._rank_rows:
            raise InvalidInputError(
                f"state was saved for {state.get('num_rows')} rows per rank, this loader has "
                f"{self._rank_rows}: the store or the row subset changed"
            )
        if "plan" in state:  # states saved before it was recorded carry nothing to check
            self._check_plan(state["plan"])
        epoch = _check_int(state.get("epoch"), "epoch", 0)
        self._seed = _check_int(state.get("seed"), "seed", 0)
        self._block_sampler = None  # re-plan with the restored seed
        self._move_to(epoch)
        self._resume = _check_int(state.get("batches_consumed"), "batches_consumed", 0)
        self._notify("load_state_dict")


__all__ = ["POSITION_EVENTS", "STATE_VERSION", "Position", "PositionListener", "ResumableState"]
