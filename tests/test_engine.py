"""The ordered look-ahead stage (sparsestore.engine.OrderedMap): order, bounds, errors,
cancellation and thread lifetimes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sparsestore.engine import OrderedMap
from sparsestore.errors import InvalidInputError

NAME = "test-stage"


def stage_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(NAME)]


class Source:
    """An iterator that records what was pulled, on which thread, and whether it was closed."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.pulled: list[int] = []
        self.threads: set[str] = set()
        self.closed = False

    def __iter__(self) -> Source:
        return self

    def __next__(self) -> int:
        i = len(self.pulled)
        self.threads.add(threading.current_thread().name)
        if i == self.fail_at:
            raise KeyError(f"source failed at {i}")
        if i >= self.n:
            raise StopIteration
        self.pulled.append(i)
        return i

    def close(self) -> None:
        self.closed = True


MODES = [(0, False), (1, False), (3, False), (0, True), (2, True)]  # (threads, feed)


@pytest.mark.parametrize(("threads", "feed"), MODES)
def test_results_come_in_order_whatever_finishes_first(threads, feed):
    def slow_evens(i: int) -> tuple[int, str]:
        time.sleep(0.01 if i % 2 == 0 else 0)  # later items often finish first
        return i * i, threading.current_thread().name

    src = Source(20)
    got = list(OrderedMap(slow_evens, src, ahead=4, threads=threads, feed=feed, name=NAME))
    assert [v for v, _ in got] == [i * i for i in range(20)]
    ran_on = {name for _, name in got}
    me = threading.current_thread().name
    if threads:  # fn ran on the stage's worker threads
        assert ran_on and all(n.startswith(NAME) and "feed" not in n for n in ran_on)
    elif feed:  # on the feeder
        assert ran_on == {f"{NAME}-feed"}
    else:
        assert ran_on == {me}
    # the source is pulled by one thread: the feeder's, or the consumer's
    assert src.threads == ({f"{NAME}-feed"} if feed else {me})
    assert src.closed and stage_threads() == []


@pytest.mark.parametrize("feed", [False, True])
def test_at_most_ahead_items_in_flight(feed):
    running, peak = 0, 0
    lock = threading.Lock()
    pulled_at_yield: list[int] = []

    def fn(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.005)
        with lock:
            running -= 1
        return i

    src = Source(30)
    stage = OrderedMap(fn, src, ahead=3, threads=3, feed=feed, name=NAME)
    for i in stage:
        time.sleep(0.002)  # a slow consumer: the stage runs as far ahead as it may
        pulled_at_yield.append(len(src.pulled) - i - 1)
    assert peak <= 3
    # items pulled but not yet handed out: `ahead` (one more held by the feeder)
    assert max(pulled_at_yield) <= 3 + feed


@pytest.mark.parametrize(("threads", "feed"), MODES)
def test_a_failing_item_raises_in_its_place_and_stops_the_stage(threads, feed):
    def fn(i: int) -> int:
        if i == 5:
            raise ValueError("item 5")
        return i

    src = Source(100)
    stage = OrderedMap(fn, src, ahead=4, threads=threads, feed=feed, name=NAME)
    got = []
    with pytest.raises(ValueError, match="item 5"):
        for v in stage:
            got.append(v)
    assert got == [0, 1, 2, 3, 4]
    assert src.closed and stage_threads() == []
    assert next(stage, None) is None  # nothing after a failure
    assert len(src.pulled) <= 5 + 1 + 4 + feed  # the failed item, `ahead` after it at most


@pytest.mark.parametrize(("threads", "feed"), MODES)
def test_a_failing_source_raises_after_the_items_before_it(threads, feed):
    src = Source(100, fail_at=7)
    got = []
    stage = OrderedMap(lambda i: -i, src, ahead=5, threads=threads, feed=feed, name=NAME)
    with pytest.raises(KeyError, match="failed at 7"):
        for v in stage:
            got.append(v)
    assert got == [0, -1, -2, -3, -4, -5, -6]
    assert src.closed and stage_threads() == []


def test_close_cancels_waiting_items_and_joins_its_threads():
    started: list[int] = []
    release = threading.Event()

    def fn(i: int) -> int:
        if i:
            started.append(i)
            release.wait(5)  # items 1 and 2 hold both threads; 3.. wait in the queue
        return i

    src = Source(1000)
    stage = OrderedMap(fn, src, ahead=8, threads=2, name=NAME)
    assert next(stage) == 0
    deadline = time.monotonic() + 10
    while len(started) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(stage_threads()) == 2
    threading.Timer(0.2, release.set).start()  # close() waits for the running two
    stage.close()
    assert stage_threads() == [] and src.closed
    assert sorted(started) == [1, 2]  # the queued ones were cancelled, never run
    assert len(src.pulled) == 1 + 8  # the one handed out, `ahead` behind it
    stage.close()  # idempotent
    with pytest.raises(StopIteration):
        next(stage)


def test_a_given_executor_is_used_and_left_running():
    with ThreadPoolExecutor(2, thread_name_prefix=NAME + "-shared") as ex:
        src = Source(10)
        with OrderedMap(lambda i: threading.current_thread().name, src, ahead=2,
                        executor=ex) as stage:
            names = list(stage)
        assert all(n.startswith(NAME + "-shared") for n in names)
        assert ex.submit(lambda: 1).result() == 1  # not shut down by the stage
        assert src.closed


def test_bad_arguments():
    with pytest.raises(InvalidInputError, match="ahead"):
        OrderedMap(lambda i: i, [], ahead=0)
    with pytest.raises(InvalidInputError, match="threads"):
        OrderedMap(lambda i: i, [], threads=-1)


def test_a_fed_stage_closes_while_its_feeder_waits_for_room():
    src = Source(10_000)
    stage = OrderedMap(lambda i: i, src, ahead=2, threads=0, feed=True, name=NAME)
    assert next(stage) == 0
    deadline = time.monotonic() + 10
    while len(src.pulled) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    assert len(src.pulled) <= 1 + 2 + 1  # the queue is full: the feeder waits
    stage.close()
    assert stage_threads() == [] and src.closed
    assert src.threads == {f"{NAME}-feed"}  # pulled and closed on the feeder only


def test_a_stage_closed_before_its_first_item_starts_no_thread():
    src = Source(5)
    stage = OrderedMap(lambda i: i, src, ahead=2, threads=2, feed=True, name=NAME)
    stage.close()
    assert src.closed and src.pulled == [] and stage_threads() == []
