"""Recycled, aligned numpy buffers for the streaming path.

Decoding a pass allocates the same few sizes over and over (storage chunks, row blocks,
batches).  Fresh multi-MB arrays page-fault on first touch, and more so in processes
where glibc's dynamic mmap threshold is off (TensorFlow's ``from_generator`` sets
``M_TRIM_THRESHOLD``, which pins it at 128 KiB: every large ``malloc`` is then a fresh
``mmap``), and streaming a store into TensorFlow then spends much of its CPU time in those
faults (profiles: ``benchmarks/results/design_notes.md``).  :class:`BufferPool` hands out
arrays over memory it takes back on its own once nothing refers to the array (or any view
of it) any more, so callers never "give back" and a batch a user keeps stays valid.
:func:`release_free_heap` hands the C heap's free pages back to the OS between passes.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
import weakref
from collections import OrderedDict, deque
from typing import Any

import numpy as np

#: TensorFlow aliases (does not copy) host arrays aligned to EIGEN_MAX_ALIGN_BYTES.
ALIGN = 64


def size_class(nbytes: int) -> int:
    """``nbytes`` rounded up to one of 8 sizes per power of two (at most 12.5% slack).

    Requests that differ a little (row blocks, batches) then share reusable blocks.
    """
    if nbytes <= 4096:
        return 4096
    step = max(4096, (1 << (nbytes.bit_length() - 1)) // 8)
    return -(-nbytes // step) * step


class BufferPool:
    """Hands out uninitialised, ``ALIGN``-byte-aligned arrays backed by reusable memory.

    Each array is a :func:`numpy.frombuffer` view over a pooled block, so every slice of
    it keeps it alive (numpy stops collapsing view bases at a non-ndarray base); a
    ``weakref.finalize`` on it returns the block when the array and all its views are
    gone.  Blocks come in :func:`size_class` sizes and a request takes the smallest idle
    block of its class or up to a quarter larger.  Idle blocks beyond ``max_free`` blocks
    or ``max_idle_bytes`` bytes are released, oldest first, and so are idle blocks while
    the blocks in use and idle together exceed ``max_bytes``: memory stays bounded by what
    is in flight plus at most ``max_bytes`` minus that.
    """

    def __init__(self, max_free: int = 16, max_idle_bytes: int | None = None,
                 max_bytes: int | None = None) -> None:
        self.max_free = int(max_free)
        self.max_idle_bytes = max_idle_bytes
        self.max_bytes = max_bytes
        self._in_use = 0  # bytes of blocks handed out and not yet filed back as idle
        self._by_size: dict[int, list[np.ndarray]] = {}  # idle blocks per size, newest last
        self._order: OrderedDict[int, np.ndarray] = OrderedDict()  # id -> block, oldest first
        self._idle = 0
        self._lock = threading.Lock()
        # Finalizers only append here (atomic, no lock): one can run inside take() on the
        # same thread (a garbage collection there), where taking the lock would deadlock.
        self._returned: deque[np.ndarray] = deque()
        self.allocated = 0  # blocks created (a test and benchmark counter)
        self.reused = 0

    def take(self, shape: int | tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype`` from the pool."""
        dtype = np.dtype(dtype)
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(
            int(d) for d in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return np.empty(shape, dtype)
        size = size_class(nbytes) + ALIGN
        block = None
        with self._lock:
            self._drain()
            # The smallest idle size that fits with at most 25% to spare: row blocks vary
            # by a few percent and straddle class boundaries.
            fits = [k for k in self._by_size if size <= k <= size + size // 4]
            if fits:
                same = self._by_size[min(fits)]
                block = same.pop()  # the most recently freed: likeliest still in cache
                if not same:
                    del self._by_size[block.size]
                del self._order[id(block)]
                self._idle -= block.size
                self.reused += 1
            else:
                self.allocated += 1
            self._in_use += block.size if block is not None else size
        if block is None:
            block = np.empty(size, np.uint8)
        off = (-block.ctypes.data) % ALIGN
        # Views of ``flat`` (reshape, slices) all keep ``flat`` itself alive.
        flat = np.frombuffer(memoryview(block[off : off + nbytes]), dtype=dtype)
        weakref.finalize(flat, self._give, block)
        return flat.reshape(shape)

    def _give(self, block: np.ndarray) -> None:
        self._returned.append(block)
        if self._lock.acquire(blocking=False):  # else the holder (or the next call) drains
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        """File returned blocks as idle, then release the oldest beyond the budget (locked)."""
        while self._returned:
            block = self._returned.popleft()
            self._by_size.setdefault(block.size, []).append(block)
            self._order[id(block)] = block
            self._idle += block.size
            self._in_use -= block.size
        cap, total = self.max_idle_bytes, self.max_bytes
        while self._order and (
            len(self._order) > self.max_free or (cap is not None and self._idle > cap)
            or (total is not None and self._idle + self._in_use > total)
        ):
            _, old = self._order.popitem(last=False)
            same = self._by_size[old.size]
            same.remove(old)
            if not same:
                del self._by_size[old.size]
            self._idle -= old.size

    def idle_blocks(self) -> int:
        """Number of idle blocks."""
        with self._lock:
            self._drain()
            return len(self._order)

    def idle_bytes(self) -> int:
        """Bytes held by idle blocks (memory the pool keeps for reuse)."""
        with self._lock:
            self._drain()
            return self._idle

    def in_use_bytes(self) -> int:
        """Bytes of the blocks handed out and not yet returned."""
        with self._lock:
            self._drain()
            return self._in_use


@functools.cache
def _glibc(name: str, argtypes: tuple[Any, ...]) -> Any:
    """glibc's function ``name`` (returning int), or None where the C library has none
    (musl, macOS, Windows)."""
    try:
        # The symbols the process has loaded, libc's among them: no ``find_library``,
        # which runs ``ldconfig`` and fails while the interpreter shuts down (a pass
        # closed then still trims).
        fn = getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError, TypeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None."""
    return _glibc("malloc_trim", (ctypes.c_size_t,))


#: glibc's ``M_MMAP_THRESHOLD`` option, and the threshold set back: above Blosc's scratch
#: (about two of a chunk's blocks: 1 MiB for the 512 KiB blocks of a 4 MiB chunk).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 2**20


def restore_mmap_threshold() -> bool:
    """Serve ``malloc`` requests below 4 MiB from the C heap; a no-op without glibc.
    Returns whether it was set.

    glibc raises its mmap threshold (up to 32 MiB) as a program frees large blocks,
    unless the program sets it.  TensorFlow pins it at 128 KiB when it builds a dataset
    (its guard against heap fragmentation under Python 3.11): every larger ``malloc`` is
    then a fresh ``mmap``, faulted in page by page and unmapped on ``free``, and Blosc
    allocates its scratch on every chunk it decompresses.  Requests of 4 MiB and more
    (large tensors) stay mapped as TensorFlow wants.  The TensorFlow adapter calls this
    as each pass starts.
    """
    mallopt = _glibc("mallopt", (ctypes.c_int, ctypes.c_int))
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: Trim again once RSS has grown by this much (or an eighth) since the last trim.
TRIM_GROWTH = 32 * 2**20
_trim_lock = threading.Lock()
_rss_after_trim: int | None = None


def _rss_bytes() -> int | None:
    """This process's resident memory from ``/proc/self/statm``, or None where unreadable."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def release_free_heap(force: bool = False) -> bool:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim(0)``, as dask's
    workers do) if this process's RSS grew by ``TRIM_GROWTH`` (or an eighth) since the last
    time, or ``force``; a no-op without glibc.  Returns whether it trimmed.

    Called at the end of every loader pass: buffers that threads free into other threads'
    malloc arenas otherwise stay resident, and a loader process's RSS crept up pass after
    pass (``benchmarks/results/memory.md``).  Not every pass: memory handed back is faulted
    in again by the next pass, which slowed shuffled passes of a plain loader.
    """
    global _rss_after_trim
    trim = _malloc_trim()
    if trim is None:
        return False
    with _trim_lock:
        last, now = _rss_after_trim, _rss_bytes()
        if not force and last is not None and now is not None and (
            now - last < max(TRIM_GROWTH, last // 8)
        ):
            return False
        trim(0)
        _rss_after_trim = _rss_bytes()
        return True


__all__ = ["ALIGN", "BufferPool", "release_free_heap", "restore_mmap_threshold", "size_class"]
