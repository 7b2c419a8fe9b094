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
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from typing import Any, Generic, TypeVar

from .errors import InvalidInputError

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["OrderedMap", "Tickets"]

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
                self._pending.append(self._executor.submit(self._fn, item))

    def _next_pulled(self) -> R:
        if self._executor is None:
            return self._fn(next(self._items))
        self._fill()
        if not self._pending:
            failure, self._failure = self._failure, None
            if failure is not None:
                raise failure
            raise StopIteration
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
