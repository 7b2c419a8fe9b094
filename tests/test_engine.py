"""The ordered look-ahead stages (sparsestore.engine.OrderedMap, OrderedStreams): order,
bounds, errors, cancellation and thread lifetimes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from sparsestore.engine import OrderedMap, OrderedStreams
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


# ------------------------------------------------------------------ OrderedStreams

class Streams:
    """Streams of ``sizes[k]`` elements each (element ``(k, j)``), reserving ``nbytes``
    before each; records which streams started, finished and were closed, on which
    thread, and the bytes reserved and not yet taken."""

    def __init__(self, sizes: list[int], nbytes: int = 10, fail: tuple[int, int] | None = None,
                 delay: float = 0.0) -> None:
        self.sizes, self.nbytes, self.fail, self.delay = sizes, nbytes, fail, delay
        self.lock = threading.Lock()
        self.started: list[int] = []
        self.closed: set[int] = set()
        self.threads: set[str] = set()
        self.outstanding = 0  # reserved, not yet taken
        self.most = 0

    def __call__(self, k: int, reserve) -> Iterator[tuple[int, int]]:
        with self.lock:
            self.started.append(k)
            self.threads.add(threading.current_thread().name)
        try:
            for j in range(self.sizes[k]):
                reserve(self.nbytes)
                with self.lock:
                    self.outstanding += self.nbytes
                    self.most = max(self.most, self.outstanding)
                if (k, j) == self.fail:
                    raise ValueError(f"stream {k} failed at {j}")
                time.sleep(self.delay if k % 2 == 0 else 0)  # even streams are slow
                yield k, j
        finally:
            with self.lock:
                self.closed.add(k)

    def took(self) -> None:
        with self.lock:
            self.outstanding -= self.nbytes


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_streams_come_whole_and_in_order_whatever_finishes_first(threads):
    sizes = [3, 0, 5, 1, 4, 2]
    fn = Streams(sizes, delay=0.002)
    got = list(OrderedStreams(fn, range(len(sizes)), budget=10**6, ahead=4, threads=threads,
                              name=NAME))
    assert got == [(k, (k, j)) for k, n in enumerate(sizes) for j in range(n)]
    if threads:
        assert fn.threads and all(t.startswith(NAME) for t in fn.threads)
    else:
        assert fn.threads == {threading.current_thread().name}
    assert fn.closed == set(range(len(sizes))) and stage_threads() == []


def test_streams_stay_within_the_byte_budget():
    fn = Streams([20] * 6, nbytes=10)
    stage = OrderedStreams(fn, range(6), budget=100, ahead=6, threads=3, name=NAME)
    for _ in stage:
        time.sleep(0.002)  # a slow consumer: the streams run as far ahead as they may
        fn.took()
    # an element made beyond the budget by a stream with none waiting, at most one each
    assert 100 // 2 < fn.most <= 100 + 3 * 10
    assert stage_threads() == []


def test_an_element_bigger_than_the_budget_does_not_stall_the_consumer():
    fn = Streams([3, 3, 3], nbytes=1000)
    stage = OrderedStreams(fn, range(3), budget=10, ahead=3, threads=2, name=NAME)
    got: list = []
    t = threading.Thread(target=lambda: got.extend(stage))
    t.start()
    t.join(10)
    stalled = t.is_alive()
    stage.close()  # wakes a stalled stream, so that a failure does not hang the run
    assert not stalled, "the head stream could not make its oversized element"
    assert [v for _, v in got] == [(k, j) for k in range(3) for j in range(3)]


def test_the_first_free_streams_start_whatever_the_budget():
    release = threading.Event()
    running: list[int] = []
    peak = 0

    def fn(k: int, reserve) -> Iterator[int]:
        nonlocal peak
        running.append(k)
        peak = max(peak, len(running))
        release.wait(5)
        running.remove(k)
        yield k

    stage = OrderedStreams(fn, range(6), budget=0, free=2, ahead=6, threads=4, name=NAME)
    threading.Timer(0.2, release.set).start()
    assert [v for _, v in stage] == list(range(6))
    assert peak == 2  # four threads, a budget of nothing: the first two only


@pytest.mark.parametrize("threads", [0, 2])
def test_a_failing_stream_raises_after_its_elements_and_stops_the_stage(threads):
    fn = Streams([3, 4, 3, 3], fail=(1, 2))
    stage = OrderedStreams(fn, range(4), budget=10**6, ahead=4, threads=threads, name=NAME)
    got = []
    with pytest.raises(ValueError, match="stream 1 failed at 2"):
        for _, v in stage:
            got.append(v)
    assert got == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert next(stage, None) is None
    assert stage_threads() == [] and fn.closed == set(fn.started)


def test_close_wakes_the_streams_waiting_for_room_and_joins_them():
    fn = Streams([1000] * 4, nbytes=10)
    stage = OrderedStreams(fn, range(4), budget=50, ahead=4, threads=3, name=NAME)
    assert next(stage) == (0, (0, 0))
    deadline = time.monotonic() + 10
    while fn.outstanding < 40 and time.monotonic() < deadline:  # the others fill the budget
        time.sleep(0.005)
    stage.close()
    assert stage_threads() == []
    assert fn.closed == set(fn.started) and 0 in fn.started and 3 not in fn.started
    with pytest.raises(StopIteration):
        next(stage)


def test_a_failing_item_source_raises_after_the_streams_before_it():
    src = Source(10, fail_at=2)
    fn = Streams([2] * 10)
    stage = OrderedStreams(fn, src, budget=10**6, ahead=4, threads=2, name=NAME)
    got = []
    with pytest.raises(KeyError, match="failed at 2"):
        for _, v in stage:
            got.append(v)
    assert got == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert src.closed and stage_threads() == []
