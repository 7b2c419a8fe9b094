"""Passes over torch-style samplers: the rows a user's ``sampler``/``batch_sampler`` picks.

:class:`ExplicitSampling` is the half of :class:`~sparsestore.loader.DataLoader` that
reads batches of row ids by random access instead of blocks: the sampler's batches (a
``sampler``'s ids cut into ``batch_size`` runs), those of this loader's slot (ranks and
sub-shards deal them round-robin), the pass that decodes them (several batches at once, so
a chunk their rows share is decoded once for all of them), and the epoch's size from the
sampler's length.  The loader supplies its settings, ``_store`` and ``_slot``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidInputError
from .indexing import normalize_rows
from .sampler import explicit_unit, num_batches
from .sizing import SAMPLER_READ_BYTES

if TYPE_CHECKING:
    from .batch import Batch
    from .reader import BlockReader
    from .store import SparseStore


class ExplicitSampling:
    """A loader's passes over its ``sampler``/``batch_sampler`` (torch-style)."""

    # Supplied by the loader.
    _store: SparseStore
    _sampler: Iterable[int] | None
    _batch_sampler: Iterable[Sequence[int]] | None
    _batch_size: int
    _drop_last: bool

    if TYPE_CHECKING:
        def _row_bytes(self) -> float: ...

    if TYPE_CHECKING:
        def _slot(self) -> tuple[int, int]: ...

    def _global_row_batches(self) -> Iterator[Any]:
        if self._batch_sampler is not None:
            yield from self._batch_sampler
            return
        it = iter(self._sampler)
        while True:
            chunk = list(islice(it, self._batch_size))
            if not chunk or (self._drop_last and len(chunk) < self._batch_size):
                return
            yield chunk

    def _rank_row_batches(self) -> Iterator[np.ndarray]:
        (r, w), n = self._slot(), self._store.n_rows
        for j, ids in enumerate(self._global_row_batches()):
            if j % w != r:
                continue
            sel = normalize_rows(np.asarray(ids), n)
            if isinstance(sel, slice):
                sel = np.arange(n, dtype=np.int64)[sel]
            yield np.atleast_1d(np.asarray(sel, dtype=np.int64))

    def _explicit_pass(self, reader: BlockReader, start: int) -> Iterator[Batch]:
        batches = islice(self._rank_row_batches(), start, None)
        units = (explicit_unit(i, group) for i, group in
                 enumerate(_grouped(batches, self._sampler_read_rows())))
        stream = reader.stream(units)
        try:
            for pieces in stream:
                yield from pieces
        finally:
            stream.close()

    def _sampler_read_rows(self) -> int:
        """Rows read together (several batches): about ``SAMPLER_READ_BYTES`` decoded."""
        return max(1, int(SAMPLER_READ_BYTES // max(1.0, self._row_bytes())))

    def _explicit_total_batches(self) -> int:
        src = self._batch_sampler if self._batch_sampler is not None else self._sampler
        try:
            n = len(src)  # type: ignore[arg-type]
        except TypeError:
            raise InvalidInputError(
                "the sampler has no len(); give it __len__ to size the epoch"
            ) from None
        if self._batch_sampler is not None:
            return n
        return num_batches(n, self._batch_size, self._drop_last)

    def _sampler_num_rows(self) -> int:
        """Rows of this rank's batches of a ``sampler`` (from its length alone)."""
        n, bs = len(self._sampler), self._batch_size  # type: ignore[arg-type]
        total = self._explicit_total_batches()
        r, w = self._slot()
        mine = range(r, total, w)
        last = n - (total - 1) * bs if total else 0
        return sum(bs if j < total - 1 else last for j in mine)


__all__ = ["ExplicitSampling"]


def _grouped(batches: Iterable[np.ndarray], max_rows: int) -> Iterator[list[np.ndarray]]:
    """Consecutive batches gathered while their rows stay within ``max_rows`` (one at least)."""
    group: list[np.ndarray] = []
    n = 0
    for b in batches:
        if group and n + b.size > max_rows:
            yield group
            group, n = [], 0
        group.append(b)
        n += b.size
    if group:
        yield group
