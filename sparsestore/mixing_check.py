"""The loader's poor-mixing warning: judged by the store's own labels where it can.

:class:`MixingCheck` is the half of :class:`~sparsestore.loader.DataLoader` that, on the
first shuffled pass, decides whether units of this budget and layout hold enough blocks
for batches to mix like a permutation.  Where the worst case (a label of about as many
groups as a unit has blocks, :func:`~sparsestore.sampler.mixing_ratio`) says they might
not, it scores the store's label arrays on the first batches of the plan
(:func:`~sparsestore.mixing.ratio_to_permutation`) and warns, once, only when one of them
mixes poorly, or with no label to score; the warning names the fix that applies.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from .errors import ShuffleQualityWarning
from .mixing import ratio_to_permutation
from .sampler import BlockSampler, mixing_ratio

if TYPE_CHECKING:
    from .store import SparseStore

#: What the poor-mixing warning tells users to run: small inner chunks (each random run
#: decodes ~128 KiB, not 4 MiB) held in 8 MiB shards (few files, one index read per shard).
SHUFFLE_LAYOUT_COMMAND = "sparsestore convert OLD NEW --chunk-bytes 128KiB --shard-bytes 8MiB"

#: Batches mixing like a permutation need about ``batch_size / 1.56`` distinct runs of
#: stored rows each: label error within this factor of a true permutation's.
ACCEPTABLE_MIXING_RATIO = 1.25
MIXING_CHECK_BATCHES = 100  # batches of the first units scored by the store's labels
MIXING_CHECK_LABEL_BYTES = 128 * 2**20  # bigger labels are not read for the check
MIXING_RATIO_ADVISED = 1.15  # the budget the warning advises aims below the warning's bar
SMALL_BLOCK_BYTES = 2**20  # blocks of small (inner) chunks: rewriting the store cannot help


class MixingCheck:
    """Warns once when a shuffled unit holds too few blocks to mix like a permutation."""

    # Supplied by the loader.
    _store: SparseStore
    _bounds: list[tuple[np.ndarray, np.ndarray | None, list[np.ndarray] | None]]
    _warned: bool
    _buffer_bytes: int | None
    _batch_size: int
    _rows: np.ndarray | None
    _seed: int
    _epoch: int

    if TYPE_CHECKING:
        @property
        def _unit_bytes(self) -> int | None: ...

        def _share_sampler(self, unit_bytes: int | None) -> BlockSampler: ...

    def _warn_if_poorly_mixed(self, bs: BlockSampler) -> None:
        nbytes = self._bounds[0][1]
        if self._warned or nbytes is None or bs.n_rows == 0:
            return
        # Blocks have bytes only under a byte budget, so both sizes are set.
        unit_bytes, buffer_bytes = self._unit_bytes, self._buffer_bytes
        whole = float(nbytes.sum()) * bs.total_rows / max(1, self._store.n_rows)
        share = whole * bs.n_rows / max(1, bs.total_rows)
        if bs.fits_one_unit() or bs.n_blocks == 0:
            return  # every share is its slice of one permutation of the whole
        per_block = float(nbytes.sum()) / max(1, nbytes.size)
        # A share that fits one unit is permuted whole, but holds only its dealt blocks.
        k = max(1.0, min(unit_bytes, share) / per_block)
        ratio = mixing_ratio(k, self._batch_size)
        if ratio <= ACCEPTABLE_MIXING_RATIO:
            return
        labels = self._mixing_labels()
        measured = self._label_mixing(bs, labels)
        if measured and max(measured.values()) <= ACCEPTABLE_MIXING_RATIO:
            return  # the store's own labels mix like a permutation: no worst case to fear
        self._warned = True
        mib = 2**20
        if measured:
            name, worst = max(measured.items(), key=lambda kv: kv[1])
            mix = (f"by the store's label {name!r}, a batch's label mix is {worst:.1f}x "
                   f"further from the whole store's than a true permutation's")
            # The budget (doubled until) under which the store's labels mix well, by the
            # same scoring; a store that fits one unit is a permutation on every share.
            budget = int(buffer_bytes)
            while budget // 2 < whole:
                budget *= 2
                again = self._label_mixing(self._share_sampler(budget // 2), labels)
                if again and max(again.values()) <= MIXING_RATIO_ADVISED:
                    break
        else:
            mix = (f"on rows stored sorted by a label of about {k:.0f} groups (the worst "
                   f"case), a batch's label mix is about {ratio:.1f}x further from the whole "
                   f"store's than a true permutation's (labels of far fewer groups mix "
                   f"better: `sparsestore shuffle-check STORE --label NAME` measures yours)")
            # The budget whose units would hold enough blocks (units grow with the budget).
            need = k
            while mixing_ratio(need, self._batch_size) > MIXING_RATIO_ADVISED and need < 2**40:
                need *= 1.25
            budget = int(buffer_bytes * need / k)
        enough = f"shuffle_buffer_bytes={-(-budget // mib)}MiB"
        fix = (f"raise the budget: {enough} (the store's chunks are already small)"
               if per_block <= SMALL_BLOCK_BYTES else
               f"rewrite the store with small chunks: `{SHUFFLE_LAYOUT_COMMAND}`, or raise "
               f"the budget ({enough})")
        warnings.warn(
            f"shuffle=True mixes poorly on this store: a {unit_bytes / mib:.0f} MiB "
            f"shuffle unit (shuffle_buffer_bytes={buffer_bytes}) holds about {k:.0f} of "
            f"its {per_block / mib:.1f} MiB chunk-sized blocks, so a batch of "
            f"{self._batch_size} rows draws from few runs of neighbouring rows; {mix}. "
            f"To mix like one, {fix}.",
            ShuffleQualityWarning, stacklevel=4,
        )

    def _mixing_labels(self) -> dict[str, np.ndarray]:
        """The store labels the check scores: one value per row, at most
        :data:`MIXING_CHECK_LABEL_BYTES` each (read whole, once)."""
        out = {}
        for name, lab in self._store.labels.items():
            one_per_row = lab.ndim == 1 or (lab.ndim == 2 and lab.shape[1] == 1)
            if one_per_row and len(lab) * lab.dtype.itemsize <= MIXING_CHECK_LABEL_BYTES:
                out[name] = np.asarray(lab).reshape(-1)
        return out

    def _label_mixing(self, bs: BlockSampler, labels: dict[str, np.ndarray]
                      ) -> dict[str, float]:
        """Each of ``labels``' batch mix over a permutation's, on the first
        :data:`MIXING_CHECK_BATCHES` batches of this epoch's plan (index math)."""
        if not labels:
            return {}
        plan = bs.plan(self._epoch)
        want = MIXING_CHECK_BATCHES * self._batch_size
        parts, have = [], 0
        for u in range(plan.n_units):
            parts.append(plan.unit(u).rows)
            have += parts[-1].size
            if have >= want:
                break
        rows = np.concatenate(parts)[:want] if parts else np.zeros(0, np.int64)
        out = {}
        for name, values in labels.items():
            r = ratio_to_permutation(values, rows, self._batch_size,
                                     population=self._rows, seed=self._seed)
            if r is not None:
                out[name] = r
        return out


__all__ = [
    "ACCEPTABLE_MIXING_RATIO",
    "MIXING_CHECK_BATCHES",
    "MIXING_CHECK_LABEL_BYTES",
    "MIXING_RATIO_ADVISED",
    "SHUFFLE_LAYOUT_COMMAND",
    "SMALL_BLOCK_BYTES",
    "MixingCheck",
]
