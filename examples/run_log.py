"""What the multi-process examples log per epoch, beside their training: shared by
``torch_ddp.py``, ``tf_multiworker.py`` and ``jax_multiprocess.py``, read by
``benchmarks/bench_multiworker.py``."""

from __future__ import annotations

import json
import time
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


def log_epoch(out: Path, rank: int, epoch: int, seconds: float, data_s: float, steps: int,
              rows: int) -> None:
    """Append one epoch's wall time, input wait, steps and rows trained on to
    ``OUT/epochs-rank<r>.jsonl``: what ``benchmarks/bench_multiworker.py`` reads."""
    with open(out / f"epochs-rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"epoch": epoch, "seconds": seconds, "data_s": data_s,
                            "steps": steps, "rows": rows}) + "\n")
