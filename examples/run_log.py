"""What the multi-process examples share: their common command-line options and what they
log per epoch beside their training.  Used by ``torch_ddp.py``, ``tf_multiworker.py`` and
``jax_multiprocess.py``; the logs are read by ``benchmarks/bench_multiworker.py``."""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class Waited:
    """Iterate ``it``, adding the seconds spent waiting for each item to ``seconds``: how
    much of an epoch's wall time the input pipeline took (the rest is the training step)."""

    def __init__(self, it: Any) -> None:
        self.it, self.seconds = iter(it), 0.0

    def __iter__(self) -> Waited:
        return self

    def __next__(self) -> Any:
        t = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.seconds += time.perf_counter() - t


class MemoryInput:
    """``--memory-input``: the first ``keep`` batches of the first pass, held in memory and
    served again and again for every step.  The same training with the store and the
    loader out of the way: what the framework's step and collectives alone allow, measured
    beside the loader by ``benchmarks/bench_multiworker.py``."""

    def __init__(self, keep: int = 4) -> None:
        self.keep, self.held = keep, None

    def __call__(self, batches: Iterable[Any], steps: int) -> Iterator[Any]:
        if self.held is None:
            it = iter(batches)
            self.held = list(itertools.islice(it, self.keep))
            getattr(it, "close", lambda: None)()  # the pass stops here
        held = self.held
        return (held[i % len(held)] for i in range(steps))


def log_epoch(out: Path, rank: int, epoch: int, seconds: float, data_s: float, steps: int,
              rows: int) -> None:
    """Append one epoch's wall time, input wait, steps and rows trained on to
    ``OUT/epochs-rank<r>.jsonl``: what ``benchmarks/bench_multiworker.py`` reads."""
    with open(out / f"epochs-rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"epoch": epoch, "seconds": seconds, "data_s": data_s,
                            "steps": steps, "rows": rows}) + "\n")


def add_training_arguments(p: argparse.ArgumentParser, per: str, out: str) -> None:
    """The options every multi-process example takes: the store, a synthetic one's size,
    epochs, the batch size (``per`` process, rank or worker), learning rate, output folder."""
    p.add_argument("--store", required=True, help="path or URL (s3://...) of the store")
    p.add_argument("--storage-options", default=None, help="fsspec options, as JSON")
    p.add_argument("--rows", type=int, default=0,
                   help="build a synthetic store of this many rows if --store does not exist")
    p.add_argument("--cols", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256, help=f"per {per}")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--out", default=out)
    p.add_argument("--memory-input", action="store_true",
                   help="train on the first batches again and again from memory (the "
                   "framework's own ceiling, without the loader)")


def add_resume_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the examples that shuffle and checkpoint (and, in tests, crash)."""
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps (0: never)")
    p.add_argument("--crash-at-step", type=int, default=0, help=argparse.SUPPRESS)
