"""An ordered, bounded look-ahead stage: a function over an iterator's items, on threads.

:class:`OrderedMap` pulls items from an iterator on the consumer's thread, runs ``fn`` on
each in worker threads, at most ``ahead`` items beyond the one the consumer waits for, and
hands the results back in the items' order.  An exception (from ``fn`` or from the
iterator) reaches the consumer where its item would have been, after every item before
it; :meth:`OrderedMap.close` cancels what has not started and joins the stage's threads,
so none outlives the pass that made it.  The loader runs each batch's backend ``host``
step on one (see :meth:`sparsestore.loader.DataLoader.iter_converted`).

The iterator is only ever advanced by the consumer's thread: an iterator that is not
thread-safe (a generator, a pass of the reader) is safe here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from typing import Generic, TypeVar

from .errors import InvalidInputError

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["OrderedMap"]


def _count(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class OrderedMap(Generic[T, R]):
    """``fn(item)`` for each item of ``items``, in order, computed up to ``ahead`` items ahead
    of the one the consumer waits for (pulled from ``items`` by the consumer's thread).

    ``threads`` worker threads (named ``name``) are started on first use and joined by
    :meth:`close`; ``threads=0`` runs ``fn`` in the consumer's thread, item by item (no
    look-ahead, no thread).  With ``executor`` the stage submits there instead (threads
    it does not own: :meth:`close` waits for its own running items, never shuts it down).
    Closing also closes ``items`` when it has a ``close`` method (a generator's pass).
    """

    def __init__(self, fn: Callable[[T], R], items: Iterable[T], *, ahead: int = 2,
                 threads: int = 1, name: str = "sparsestore-stage",
                 executor: Executor | None = None) -> None:
        self._fn = fn
        self._items: Iterator[T] = iter(items)
        self._ahead = _count(ahead, "ahead", 1)
        threads = _count(threads, "threads", 0)
        self._owned = executor is None and threads > 0
        self._executor: Executor | None = executor if executor is not None else (
            ThreadPoolExecutor(threads, thread_name_prefix=name) if threads else None)
        self._pending: deque[Future[R]] = deque()
        self._failure: BaseException | None = None  # the iterator's, after the pending items
        self._exhausted = False
        self._closed = False

    def __iter__(self) -> OrderedMap[T, R]:
        return self

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

    def __next__(self) -> R:
        if self._closed:
            raise StopIteration
        try:
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
        for fut in self._pending:
            fut.cancel()
        try:
            if self._owned:
                assert self._executor is not None
                self._executor.shutdown(wait=True, cancel_futures=True)
            elif self._pending:
                wait(self._pending)
        finally:
            self._pending.clear()
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> OrderedMap[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
