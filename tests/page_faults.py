"""A probe of glibc's mmap threshold, shared by tests (and run in their subprocesses)."""

from __future__ import annotations

import resource
import threading

import numpy as np


def faults_per_alloc(nbytes: int = 260 * 1024, n: int = 100) -> float:
    """Page faults per ``malloc``-and-touch of ``nbytes`` on a fresh thread (its own
    arena): ~nbytes / 4096 when each is a fresh mmap, ~0 when served from the C heap."""
    got = []

    def work() -> None:
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(n):
            x = np.empty(nbytes // 8)
            x.fill(1.0)
            del x
        got.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / n)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    return got[0]
