"""A loopback HTTP proxy that adds a fixed delay to every request and counts them.

Object storage is slow per request, not per byte: a GET to S3 in the same region takes
some 10-30 ms before its first byte, whatever its size.  A local S3 server (moto) answers
in well under a millisecond, so a reader that sends one request at a time, or two per
chunk, looks fine against it and crawls against the real thing.  :class:`LatencyProxy`
sits between the client and such a server (on 127.0.0.1 only) and holds every request
``delay`` seconds before passing it on, so the tests and benchmarks see what request
latency costs, and it counts what went through: requests per HTTP method (parsed from
each request line) and the most requests in flight at once.

It speaks plain HTTP/1.x: each request and response is framed by its Content-Length,
chunked encoding, or (responses only) the connection closing, so keep-alive connections
are followed request by request.  It runs its own asyncio loop on a daemon thread and is
used as a context manager or with :meth:`start` / :meth:`stop`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from typing import Any
from urllib.parse import urlsplit

_HEADER_END = b"\r\n\r\n"
_MAX_HEADER = 1 << 20


class _Closed(Exception):
    """The peer closed the connection between messages."""


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """A message's start line and headers (up to and with the blank line)."""
    try:
        return await reader.readuntil(_HEADER_END)
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise
        raise _Closed from None
    except asyncio.LimitOverrunError:
        raise ValueError("HTTP header too large") from None


def _headers(head: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            name, _, value = line.partition(b":")
            out[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return out


async def _copy_body(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     *, response: bool, no_body: bool) -> bool:
    """Copy the body that follows ``head`` from ``reader`` to ``writer``; False when the
    body ran to the connection's end (the connection is done)."""
    h = _headers(head)
    if no_body:
        return True
    if "chunked" in h.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            writer.write(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:  # trailers, then a blank line
                while True:
                    line = await reader.readuntil(b"\r\n")
                    writer.write(line)
                    if line == b"\r\n":
                        return True
            writer.write(await reader.readexactly(size + 2))
            await writer.drain()
    if "content-length" in h:
        left = int(h["content-length"])
        while left:
            block = await reader.read(min(left, 1 << 20))
            if not block:
                raise ConnectionError("connection closed inside a message body")
            writer.write(block)
            left -= len(block)
            await writer.drain()
        return True
    if not response:  # a request without a length has no body
        return True
    while block := await reader.read(1 << 20):  # until the server closes
        writer.write(block)
        await writer.drain()
    return False


class LatencyProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream`` (``http://host:port``), delaying each
    request by ``delay`` seconds; :attr:`counts` (per method), :attr:`max_in_flight`."""

    def __init__(self, upstream: str, delay: float = 0.0) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the latency proxy only forwards to loopback, not {upstream}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.delay = float(delay)
        self.counts: collections.Counter[str] = collections.Counter()
        #: ``(method, target)`` of every request since the last :meth:`reset`.
        self.log: list[tuple[str, str]] = []
        #: When each request of :attr:`log` arrived (``time.monotonic()``).
        self.arrived: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.port = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------ lifecycle
    @property
    def endpoint_url(self) -> str:
        """The URL clients use instead of the upstream's."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LatencyProxy:
        """Listen on a free loopback port (its own event loop, on a daemon thread)."""
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            self._server = await asyncio.start_server(self._client, "127.0.0.1", 0,
                                                      limit=_MAX_HEADER)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="latency-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the latency proxy did not start")
        return self

    def stop(self) -> None:
        """Close the listener and every open connection, then the loop."""
        loop = self._loop
        if loop is None:
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        loop.close()
        self._loop = None

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ counters
    def reset(self) -> None:
        """Zero the counters (between the phases a test or benchmark measures)."""
        with self._lock:
            self.counts.clear()
            self.log.clear()
            self.arrived.clear()
            self.max_in_flight = self.in_flight

    def snapshot(self) -> dict[str, Any]:
        """The counters now: requests per method, their total, the most in flight."""
        with self._lock:
            counts = dict(self.counts)
            return {"requests": sum(counts.values()), "by_method": counts,
                    "max_in_flight": self.max_in_flight}

    def round_trips(self, gap: float | None = None) -> int:
        """Requests since :meth:`reset` that went out one after another: arrivals grouped
        into waves, a new wave where one comes more than ``gap`` (default: half the delay)
        after the one before.  Requests sent together arrive within a few milliseconds;
        one that needed an earlier answer comes at least a delay later."""
        gap = self.delay / 2 if gap is None else gap
        with self._lock:
            times = sorted(self.arrived)
        return sum(1 for i, t in enumerate(times) if i == 0 or t - times[i - 1] > gap)

    def _begin(self, method: str, target: str) -> None:
        with self._lock:
            self.counts[method] += 1
            self.log.append((method, target))
            self.arrived.append(time.monotonic())
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _end(self) -> None:
        with self._lock:
            self.in_flight -= 1

    # ------------------------------------------------------------ forwarding
    async def _client(self, c_reader: asyncio.StreamReader,
                      c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        u_writer = None
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream, limit=_MAX_HEADER)
            while True:
                try:
                    head = await _read_head(c_reader)
                except _Closed:
                    return
                line = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
                method = line[0].upper()
                self._begin(method, line[1] if len(line) > 1 else "")
                try:
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    u_writer.write(head)
                    await _copy_body(head, c_reader, u_writer, response=False, no_body=False)
                    await u_writer.drain()
                    while True:  # 1xx interim responses precede the real one
                        r_head = await _read_head(u_reader)
                        c_writer.write(r_head)
                        status = int(r_head.split(b" ", 2)[1])
                        if status >= 200 or status == 101:
                            break
                    no_body = method == "HEAD" or status in (204, 304) or status < 200
                    more = await _copy_body(r_head, u_reader, c_writer, response=True,
                                            no_body=no_body)
                    await c_writer.drain()
                finally:
                    self._end()
                if not more:
                    return
        except (_Closed, ConnectionError, asyncio.IncompleteReadError, ValueError, OSError):
            return
        finally:
            self._tasks.discard(task)
            for w in (c_writer, u_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()


__all__ = ["LatencyProxy"]
