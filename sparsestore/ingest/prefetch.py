"""A prefetching reader: items of ``n`` sources produced by background threads, handed out
in order, within a byte budget.

:class:`Reader` runs ``workers`` threads that take sources in order and produce their items
ahead of the consumer; a producer calls ``reserve(nbytes)`` before decoding an item, and
waits there while the bytes produced and not yet taken would pass ``lookahead_bytes``.  A
producer's exception reaches the consumer in order, after the items before it; closing the
reader (or exhausting it) joins the threads.  The npz source (:mod:`.npz`) reads its shards
through it.

It is not :meth:`sparsestore.reader.BlockReader.stream`: that one decodes each unit whole as
one task, with ``prefetch`` units in flight, while here a source yields many items (a CSR
shard's units, inflated in order from one zip member stream) and memory is bounded in bytes.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from typing import Any

# Decompressed bytes read ahead of the writer (besides the unit it is on): the writer takes
# data in bursts (a chunk of values and one of indices at a time), faster than one thread
# inflates it.  With ``executor=``, ``workers - 1`` whole shards ahead at least.
DEFAULT_LOOKAHEAD_BYTES = 16 * 2**20

Reserve = Callable[[int], None]


def no_reserve(nbytes: int) -> None:
    """A ``reserve`` that reserves nothing (items produced in the consuming thread)."""


class _Slot:
    """One shard's items, produced by a worker and not yet taken by the consumer."""

    __slots__ = ("done", "error", "items")

    def __init__(self) -> None:
        self.items: collections.deque[tuple[Any, int]] = collections.deque()
        self.done = False
        self.error: BaseException | None = None


class _Closed(Exception):
    """The reader was closed while a worker waited for room."""


Produce = Callable[[int, Reserve], Iterator[Any]]


class Reader:
    """``(shard index, item)`` of ``produce(i, reserve)`` for every shard, in shard order.

    ``workers=1`` produces each shard in the consuming thread when it is asked for: one
    thread, no overlap, one item at a time.  Otherwise ``workers`` threads take shards in
    order and produce their items ahead of the consumer, as long as the bytes reserved and
    not yet taken stay within ``lookahead_bytes``: a worker calls ``reserve(nbytes)`` before
    decoding an item.  The first ``free`` shards not yet taken may always produce an item
    when they have none waiting, so an item bigger than the budget cannot stall the
    consumer.  Memory: the budget, an item per worker at most beyond it, and the item the
    consumer is on.  Call :meth:`close` (or exhaust it) to stop the workers.
    """

    def __init__(self, n: int, produce: Produce, *, workers: int,
                 lookahead_bytes: int = DEFAULT_LOOKAHEAD_BYTES, free: int = 1) -> None:
        self.n, self.produce = n, produce
        self.budget, self.free = int(lookahead_bytes), max(1, int(free))
        lock = threading.Lock()
        self.cv = threading.Condition(lock)  # the consumer waits on this for items
        self.room = threading.Condition(lock)  # the workers wait on this for budget
        self.slots: collections.deque[_Slot] = collections.deque()  # started, in order
        self.ahead = 0  # bytes reserved by the workers and not yet taken by the consumer
        self.next = 0  # the next shard to start
        self.closed = False
        self.inline: Iterator[Any] | None = None  # workers=1: the current shard's items
        self.threads = [
            threading.Thread(target=self._work, name=f"sparsestore-npz-{i}", daemon=True)
            for i in range(workers if workers > 1 else 0)
        ]
        for t in self.threads:
            t.start()

    # ------------------------------------------------------------- workers
    def _work(self) -> None:
        while True:
            with self.cv:
                # Start another shard only while the budget has room (or few wait).
                while (not self.closed and self.next < self.n
                       and len(self.slots) >= self.free and self.ahead >= self.budget):
                    self.room.wait()
                if self.closed or self.next >= self.n:
                    return
                i = self.next
                self.next += 1
                slot = _Slot()
                self.slots.append(slot)
            self._fill(slot, i)

    def _may_exceed(self, slot: _Slot) -> bool:
        """Whether ``slot`` is among the first ``free`` and has nothing waiting (lock held)."""
        if slot.items:
            return False
        for k, s in enumerate(self.slots):
            if s is slot:
                return k < self.free
        return False

    def _fill(self, slot: _Slot, i: int) -> None:
        reserved = 0

        def reserve(nbytes: int) -> None:
            nonlocal reserved
            with self.cv:
                while (not self.closed and self.ahead + nbytes > self.budget
                       and not self._may_exceed(slot)):
                    self.room.wait()
                if self.closed:
                    raise _Closed
                self.ahead += nbytes
                reserved += nbytes

        items = self.produce(i, reserve)
        try:
            for item in items:
                with self.cv:
                    slot.items.append((item, reserved))
                    reserved = 0
                    self.cv.notify()
                del item
        except _Closed:
            pass
        except BaseException as exc:  # handed to the consumer, in order
            slot.error = exc
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
            with self.cv:
                self.ahead -= reserved  # reserved for an item that never came
                slot.done = True
                self.cv.notify()
                self.room.notify_all()

    # ------------------------------------------------------------- consumer
    def __iter__(self) -> Reader:
        return self

    def __next__(self) -> tuple[int, Any]:
        if not self.threads:
            return self._next_inline()
        err: BaseException | None = None
        with self.cv:
            while not self.closed:
                if not self.slots:
                    if self.next >= self.n:
                        break
                    self.cv.wait()
                    continue
                head = self.slots[0]
                if head.items:
                    item, size = head.items.popleft()
                    self.ahead -= size
                    self.room.notify_all()
                    return self.next - len(self.slots), item
                if head.error is not None:
                    err = head.error
                    break
                if head.done:
                    self.slots.popleft()
                    self.room.notify_all()  # a new head may go beyond the budget
                    continue
                self.cv.wait()
        self.close()
        if err is not None:
            raise err
        raise StopIteration

    def _next_inline(self) -> tuple[int, Any]:
        while not self.closed:
            if self.inline is None:
                if self.next >= self.n:
                    break
                self.inline = iter(self.produce(self.next, no_reserve))
                self.next += 1
            try:
                return self.next - 1, next(self.inline)
            except StopIteration:
                self.inline = None
            except BaseException:
                self.close()
                raise
        self.close()
        raise StopIteration

    def close(self) -> None:
        """Stop the workers (each finishes the item it is decoding) and drop the rest."""
        with self.cv:
            self.closed = True
            self.slots.clear()
            self.cv.notify_all()
            self.room.notify_all()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join()
        if self.inline is not None:
            inline, self.inline = self.inline, None
            close = getattr(inline, "close", None)
            if close is not None:
                close()


__all__ = ["DEFAULT_LOOKAHEAD_BYTES", "Produce", "Reader", "Reserve", "no_reserve"]
