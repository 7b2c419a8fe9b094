"""``from_dask(path, darr)``: a 2-D dask array written as a new store without gathering it.

Row blocks are computed in parallel by the current scheduler (futures on a ``distributed``
client, or the threaded scheduler one window ahead of the writer) and written in row order
through the one atomic write path.  Not supported: ops that turn zeros into non-zeros
(``darr + 1``).  The other direction, a store as a lazy dask array, is
:mod:`sparsestore.dask`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp

from .dask import current_client
from .errors import InvalidInputError, ShapeMismatchError


def _default_window(client: Any) -> int:
    if client is not None:
        return max(2, 2 * sum(client.nthreads().values()))
    workers = dask.config.get("num_workers", None) or dask.system.CPU_COUNT
    return max(2, 2 * int(workers))


def _ordered(items: list[Any], window: int) -> Iterator[Any]:
    """Compute delayed items in parallel, at most ``window`` at a time, yielding in order."""
    client = current_client()
    if client is not None:
        it = iter(items)
        futs = deque(client.compute(d) for d in islice(it, window))
        try:
            while futs:
                fut = futs.popleft()
                res = fut.result()
                fut.release()
                nxt = next(it, None)
                if nxt is not None:
                    futs.append(client.compute(nxt))
                yield res
        finally:
            for fut in futs:
                fut.cancel()
        return
    # Local schedulers: compute the next window in a background thread while the
    # caller writes this one (memory: two windows of blocks at most).
    groups = [items[i : i + window] for i in range(0, len(items), window)]
    if not groups:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="sparsestore-from-dask") as ex:
        fut = ex.submit(dask.compute, *groups[0])
        for g in groups[1:]:
            done = fut.result()
            fut = ex.submit(dask.compute, *g)
            yield from done
        yield from fut.result()


def _as_block(b: Any) -> Any:
    if sp.issparse(b):
        return b
    if hasattr(b, "to_scipy_sparse"):  # pydata/sparse COO
        return b.to_scipy_sparse()
    return np.asarray(b)


def _pair(block: Any, labels: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    return block, labels


def from_dask(
    path: Any,
    darr: Any,
    labels: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    *,
    sparse: bool = True,
    keep_zeros: bool = False,
    dtype: Any = None,
    window: int | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
    casting: str = "same_value",
    **layout_options: Any,
) -> Any:
    """Write a 2-D dask array (sparse or dense chunks) as a new store, without gathering it.

    Design: row blocks (``darr.to_delayed()``, columns merged first) are computed in
    parallel by the current scheduler -- futures on a ``distributed`` client, or the
    threaded scheduler one window ahead of the writer -- with at most ``window`` blocks
    in flight (default: twice the worker threads), and are written in row order through
    :func:`sparsestore.write_blocks`, the one atomic write path: nothing appears at
    ``path`` unless every block landed.  ``labels`` maps names to numpy-like or dask arrays
    with one entry per row (dask labels are computed alongside their row blocks).
    Each computed block is cast to ``dtype`` (default: the dtype dask's metadata claims,
    which a block may not have) by :func:`~sparsestore.canonical.cast_values`:
    ``casting="same_value"`` refuses a value the dtype cannot hold, ``"unsafe"`` stores
    numpy's cast.
    """
    from .progress import make_bar
    from .writer import write_blocks

    if not isinstance(darr, da.Array):
        raise InvalidInputError(
            f"from_dask needs a dask.array.Array, got {type(darr).__name__}; use "
            "sparsestore.save for in-memory matrices"
        )
    if darr.ndim != 2:
        raise InvalidInputError(f"expected a 2-D dask array, got {darr.ndim}-D {darr.shape}")
    n_cols = darr.shape[1]
    if np.isnan(n_cols):
        raise InvalidInputError("the number of columns is unknown; call compute_chunk_sizes()")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise InvalidInputError(f"window must be a positive integer, got {window!r}")
    if darr.numblocks[1] > 1:
        darr = darr.rechunk({1: -1})
    n_rows = darr.shape[0]
    known = not np.isnan(n_rows)
    blocks = list(darr.to_delayed()[:, 0])
    lab_dask: dict[str, Any] = {}
    lab_np: dict[str, Any] = {}
    order = list(labels or {})
    for name, value in (labels or {}).items():
        rows = value.shape[0] if hasattr(value, "shape") else len(value)
        if known and not np.isnan(rows) and rows != n_rows:
            raise ShapeMismatchError(
                f"label {name!r} has {rows} entries but the array has {n_rows} rows; "
                "labels need one entry per row"
            )
        if isinstance(value, da.Array):
            if not known:
                raise InvalidInputError(
                    "dask labels need known row chunks; call darr.compute_chunk_sizes()"
                )
            value = value.rechunk((darr.chunks[0],) + tuple((s,) for s in value.shape[1:]))
            lab_dask[name] = value.to_delayed().reshape(value.numblocks[0], -1)[:, 0]
        else:
            lab_np[name] = value if hasattr(value, "shape") else np.asarray(value)
    if lab_dask:
        pair = dask.delayed(_pair, pure=True)
        items = [
            pair(b, {k: v[i] for k, v in lab_dask.items()}) for i, b in enumerate(blocks)
        ]
    else:
        items = blocks
    client = current_client()
    win = window or _default_window(client)
    bar = make_bar(progress, int(n_rows) if known else None, "from_dask")

    def gen() -> Iterator[tuple[Any, dict[str, Any] | None]]:
        start = 0
        for res in _ordered(items, win):
            block, labs = res if lab_dask else (res, {})
            block = _as_block(block)
            stop = start + block.shape[0]
            out = {}
            for k in order:  # the caller's label order
                if k in lab_np:
                    v = lab_np[k]
                    if v.shape[0] < stop:
                        raise ShapeMismatchError(
                            f"label {k!r} has {v.shape[0]} entries, fewer than the array's rows"
                        )
                    out[k] = np.asarray(v[start:stop])
                else:
                    out[k] = np.asarray(labs[k])
            start = stop
            yield block, (out or None)
        for k, v in lab_np.items():
            if v.shape[0] != start:
                raise ShapeMismatchError(
                    f"label {k!r} has {v.shape[0]} entries but the array has {start} rows"
                )

    with bar:
        return write_blocks(
            path,
            gen(),
            n_cols=int(n_cols),
            dtype=dtype if dtype is not None else darr.dtype,
            sparse=sparse,
            keep_zeros=keep_zeros,
            overwrite=overwrite,
            storage_options=storage_options,
            progress=bar,
            casting=casting,
            **layout_options,
        )


__all__ = ["from_dask"]
