"""An ordered, bounded look-ahead stage: a function over an iterator's items, on threads.

:class:`OrderedMap` pulls items from an iterator on the consumer's thread, runs ``fn`` on
each in worker threads, at most ``ahead`` items beyond the one the consumer waits for, and
hands the results back in the items' order.  An exception (from ``fn`` or from the
iterator) reaches the consumer where its item would have been, after every item before
it; :meth:`OrderedMap.close` cancels what has not started and joins the stage's threads,
so none outlives the pass that made it.  The loader runs each batch's backend ``host``
step on one (see :meth:`sparsestore.loader.DataLoader.iter_converted`).

The iterator is only ever advanced by one thread, so one that is not thread-safe (a
generator, a pass of the reader) is safe here: the consumer's, or with ``feed=True`` the
stage's own feeder thread, which then takes the iterator's work off the consumer too.

:class:`OrderedStreams` is the same stage for items that each give many elements (an npz
shard's units, inflated in order): the streams run ahead on threads, their elements
handed out in order, the memory ahead bounded in bytes rather than in items.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from typing import Any, Generic, NoReturn, TypeVar

from .errors import InvalidInputError

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["OrderedMap", "OrderedStreams", "Tickets"]

# What the feeder queues: (kind, value)
_VALUE, _FUTURE, _RAISED, _END = "value", "future", "raised", "end"


def _count(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class OrderedMap(Generic[T, R]):
    """``fn(item)`` for each item of ``items``, in order, computed up to ``ahead`` items ahead
    of the one the consumer waits for.

    ``threads`` worker threads (named ``name``) run ``fn``; with ``executor`` the stage
    submits there instead (threads it does not own: :meth:`close` waits for its running
    items and leaves it open).  ``items`` is pulled by the consumer's thread, or with
    ``feed=True`` by a feeder thread of the stage's own (``name-feed``), which also runs
    ``fn`` itself when ``threads=0``: one background thread doing the whole work.  Without
    ``feed``, ``threads=0`` runs everything in the consumer's thread, item by item (no
    look-ahead, no thread).  Threads start on first use; :meth:`close` joins them and
    closes ``items`` when it has a ``close`` method (a generator's pass).
    """

    def __init__(self, fn: Callable[[T], R], items: Iterable[T], *, ahead: int = 2,
                 threads: int = 1, feed: bool = False, name: str = "sparsestore-stage",
                 executor: Executor | None = None) -> None:
        self._fn = fn
        self._items: Iterator[T] = iter(items)
        self._ahead = _count(ahead, "ahead", 1)
        threads = _count(threads, "threads", 0)
        self._name, self._feed_on = name, bool(feed)
        self._owned = executor is None and threads > 0
        self._executor: Executor | None = executor if executor is not None else (
            ThreadPoolExecutor(threads, thread_name_prefix=name) if threads else None)
        self._pending: deque[Future[R]] = deque()  # consumer-pulled: the items in flight
        # fed: the feeder's queue of (kind, value) and its free places
        self._ready: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._room = threading.Semaphore(self._ahead)
        self._feeder: threading.Thread | None = None
        self._failure: BaseException | None = None  # the iterator's, after the pending items
        self._exhausted = False
        self._closed = False

    def __iter__(self) -> OrderedMap[T, R]:
        return self

    # -- items pulled by the consumer
    def _fill(self) -> None:
        """Submit items until ``ahead`` are in flight or the iterator ends (or fails)."""
        assert self._executor is not None
        while not self._exhausted and len(self._pending) < self._ahead:
            try:
                item = next(self._items)
            except StopIteration:
                self._exhausted = True
            except Exception as exc:  # noqa: BLE001 - raised in order, in __next__
                self._exhausted, self._failure = True, exc
            else:
                self._pending.append(self._submit(item))

    def _submit(self, item: T) -> Future[R]:
        assert self._executor is not None
        return self._executor.submit(self._fn, item)

    def _finish(self) -> NoReturn:
        """Nothing left in flight: raise the iterator's failure, or the end."""
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
        raise StopIteration

    def _next_pulled(self) -> R:
        if self._executor is None:
            return self._fn(next(self._items))
        self._fill()
        if not self._pending:
            self._finish()
        head = self._pending.popleft()
        self._fill()  # keep `ahead` items working while the consumer waits and works
        return head.result()

    # -- items pulled by the feeder thread
    def _feed(self) -> None:
        """The feeder: pull, compute (or submit), queue in order; the end or a failure last.

        A C queue carries the entries and a semaphore counts the free places, so that an
        item costs the consumer one ``get`` and one ``release``: the hand-off is most of
        what a cheap ``fn`` costs."""
        put = self._ready.put
        try:
            for item in self._items:
                self._room.acquire()
                if self._closed:
                    return
                if self._executor is not None:
                    put((_FUTURE, self._executor.submit(self._fn, item)))
                    continue
                try:
                    put((_VALUE, self._fn(item)))
                except Exception as exc:  # noqa: BLE001 - raised in its place, then nothing
                    put((_RAISED, exc))
                    return
            self._room.acquire()  # the end, or a failure, takes a place as an item does
            put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, in order
            put((_RAISED, exc))
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def _next_fed(self) -> R:
        if self._feeder is None:
            self._feeder = threading.Thread(target=self._feed, name=f"{self._name}-feed",
                                            daemon=True)
            self._feeder.start()
        kind, value = self._ready.get()
        self._room.release()
        if kind is _VALUE:
            return value
        if kind is _FUTURE:
            return value.result()
        if kind is _END:
            raise StopIteration
        raise value

    def __next__(self) -> R:
        if self._closed:
            raise StopIteration
        try:
            return self._next_fed() if self._feed_on else self._next_pulled()
        except BaseException:
            # The end, or a failure: either ends the stage (nothing after a failed item).
            self.close()
            raise

    def close(self) -> None:
        """Cancel the items not started, wait for the running ones, join the threads and
        close the iterator; idempotent."""
        if self._closed:
            return
        self._closed = True
        futures = list(self._pending)
        self._pending.clear()
        if self._feeder is not None:
            self._room.release()  # a feeder waiting for a place sees the stage closed
            while True:
                try:
                    kind, value = self._ready.get_nowait()
                except queue.Empty:
                    break
                if kind is _FUTURE:
                    futures.append(value)
        for fut in futures:
            fut.cancel()
        try:
            if self._feeder is not None:
                self._feeder.join()  # it closes the iterator, on its own thread
                while not self._ready.empty():  # what it queued meanwhile
                    kind, value = self._ready.get_nowait()
                    if kind is _FUTURE:
                        value.cancel()
                        futures.append(value)
            if self._owned:
                assert self._executor is not None
                self._executor.shutdown(wait=True, cancel_futures=True)
            elif futures:
                wait(futures)
        finally:
            if self._feeder is None:
                close = getattr(self._items, "close", None)
                if close is not None:
                    close()

    def __enter__(self) -> OrderedMap[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Stopped(Exception):
    """The stage closed while a stream waited for room."""


class _Stream:
    """One item's stream on a worker: the elements it made and the consumer has not taken
    (each with the bytes reserved for it), and whether it ended."""

    __slots__ = ("done", "elements", "item", "seq")

    def __init__(self, seq: int, item: Any) -> None:
        self.seq, self.item = seq, item
        self.elements: deque[tuple[Any, int]] = deque()
        self.done = False


def _reserve_nothing(nbytes: int) -> None:
    """The ``reserve`` of a stream run in the consumer's thread: nothing is made ahead."""


class OrderedStreams(OrderedMap[T, tuple[int, Any]]):
    """``(k, element)`` for each element of each stream ``fn(item, reserve)``, ``k`` the
    item's position in ``items``: every element of a stream before the next stream's.

    ``threads`` worker threads run the streams of up to ``ahead`` items ahead of the
    consumer, within ``budget`` bytes: a stream calls ``reserve(nbytes)`` before it makes
    an element that size, and waits there while the bytes made and not yet taken would
    pass the budget; a stream starts only while the budget has room too.  The first
    ``free`` streams not yet taken may always start, and make an element when they have
    none waiting, so that an element bigger than the budget cannot stall the consumer.
    Memory: the budget, an element per thread beyond it, and the one the consumer holds.
    A stream's exception reaches the consumer after its elements before it.  ``threads=0``
    runs each stream in the consumer's thread, an element at a time (``reserve`` then does
    nothing).  :meth:`close` wakes the waiting streams, joins the threads and closes the
    stream in progress.
    """

    def __init__(self, fn: Callable[[Any, Callable[[int], None]], Iterable[Any]],
                 items: Iterable[Any], *, budget: int, free: int = 1, ahead: int = 2,
                 threads: int = 1, name: str = "sparsestore-streams") -> None:
        super().__init__(self._run, items, ahead=ahead, threads=threads, name=name)
        self._stream = fn
        self._budget, self._free = _count(budget, "budget", 0), _count(free, "free", 1)
        self._cv = threading.Condition()
        self._used = 0  # bytes reserved by the streams and not yet taken by the consumer
        self._seq = 0  # items pulled so far
        self._taken = 0  # streams the consumer has taken to their end
        self._streams: deque[_Stream] = deque()  # pulled, in order, beside _pending
        self._inline: tuple[int, Iterator[Any]] | None = None
        self._stopping = False

    def _submit(self, item: Any) -> Future[Any]:
        stream = _Stream(self._seq, item)
        self._seq += 1
        self._streams.append(stream)
        return super()._submit(stream)  # type: ignore[arg-type]

    # -- on a worker
    def _first(self, stream: _Stream) -> bool:
        """Whether ``stream`` is among the first ``free`` not yet taken (cv held)."""
        return stream.seq - self._taken < self._free

    def _wait_for(self, ready: Callable[[], bool]) -> None:
        """Wait (cv held) until ``ready()``; raise :class:`_Stopped` if the stage closes."""
        while not self._stopping and not ready():
            self._cv.wait()
        if self._stopping:
            raise _Stopped

    def _run(self, stream: _Stream) -> None:  # type: ignore[override]
        """Make ``stream``'s elements within the budget; its exception is the future's."""
        reserved = 0

        def reserve(nbytes: int) -> None:
            nonlocal reserved
            with self._cv:
                self._wait_for(lambda: self._used + nbytes <= self._budget or (
                    not stream.elements and self._first(stream)))
                self._used += nbytes
                reserved += nbytes

        elements: Any = None
        try:
            with self._cv:
                self._wait_for(lambda: self._used < self._budget or self._first(stream))
            elements = self._stream(stream.item, reserve)
            for element in elements:
                with self._cv:
                    stream.elements.append((element, reserved))
                    reserved = 0
                    self._cv.notify_all()
                del element  # not pinned here once taken
        except _Stopped:
            pass
        finally:
            close = getattr(elements, "close", None)
            if close is not None:
                close()
            with self._cv:
                self._used -= reserved  # reserved for an element that never came
                stream.done = True
                self._cv.notify_all()

    # -- in the consumer
    def _next_pulled(self) -> tuple[int, Any]:  # type: ignore[override]
        if self._executor is None:
            return self._next_inline()
        while True:
            self._fill()
            if not self._pending:
                self._finish()
            head = self._streams[0]
            with self._cv:
                while not head.elements and not head.done:
                    self._cv.wait()
                if head.elements:
                    element, nbytes = head.elements.popleft()
                    self._used -= nbytes
                    self._cv.notify_all()
                    return head.seq, element
                self._streams.popleft()
                self._taken += 1
                self._cv.notify_all()  # a new head may pass the budget
            self._pending.popleft().result()  # the stream's exception, after its elements

    def _next_inline(self) -> tuple[int, Any]:
        while True:
            if self._inline is None:
                item = next(self._items)
                self._inline = (self._seq, iter(self._stream(item, _reserve_nothing)))
                self._seq += 1
            k, elements = self._inline
            try:
                return k, next(elements)
            except StopIteration:
                self._inline = None
                close = getattr(elements, "close", None)
                if close is not None:
                    close()

    def close(self) -> None:
        """Wake the streams waiting for room, then as :meth:`OrderedMap.close`; the stream
        in progress in the consumer's thread is closed too."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        super().close()
        with self._cv:
            self._streams.clear()
        if self._inline is not None:
            elements = self._inline[1]
            self._inline = None
            close = getattr(elements, "close", None)
            if close is not None:
                close()


class Tickets:
    """``range(n)`` handed out one number at a time to whichever thread asks next."""

    def __init__(self, n: int) -> None:
        self._next = iter(range(n))
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[int]:
        while True:
            with self._lock:
                k = next(self._next, None)
            if k is None:
                return
            yield k
