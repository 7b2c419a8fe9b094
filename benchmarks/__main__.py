"""One entry point for every benchmark: ``python -m benchmarks list|NAME [args...]|all|report``.

* ``list``: the registered benchmarks, one line each.
* ``NAME [args...]``: that benchmark's own ``main`` with ``args`` (``NAME --help`` shows them).
  Results go to ``benchmarks/out`` (git-ignored) unless ``--out`` is given:
  ``--out benchmarks/results`` replaces the committed results on purpose.
* ``all [--quick]``: every benchmark in turn (``--quick``: each at its quick size), into
  ``benchmarks/out``; one that fails is reported and the rest still run.
* ``report [--results DIR] [--readme README.md]``: regenerate every ``.md`` in ``DIR``
  (default ``benchmarks/results``) from its ``.json``, and README.md's targets table.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bench:
    """A registered benchmark: its module (with ``main``), what it measures, its quick args."""

    module: str
    description: str
    quick: tuple[str, ...] = ()
    in_all: bool = True  # run by ``all`` (False: needs an argument the runner cannot give)


REGISTRY: dict[str, Bench] = {
    "suite": Bench("run", "the suite: every case vs the usual baselines, results.json/md + PNGs",
                   ("--quick",)),
    "tf_compare": Bench("bench_tf_compare", "TF ratios: eager loop, in-graph, Keras epoch",
                        ("--quick",)),
    "memory": Bench("bench_memory", "RSS over many passes at two matrix sizes",
                    ("--rows", "20000,80000", "--passes", "3")),
    "backends": Bench("bench_backends", "JAX and PyTorch backends vs their in-memory idioms",
                      ("--rows", "20000", "--rounds", "1")),
    "integrity": Bench("bench_integrity", "what the chunk manifest costs readers",
                       ("--rows", "20000", "--rounds", "2")),
    "convert": Bench("bench_convert", "convert .npz shards: 2 workers vs 1, peak RSS",
                     ("--rows", "20000", "--reps", "2", "--rss-reps", "1", "--wait", "0")),
    "dask": Bench("bench_dask", "dask column sums interleaved (needs a suite's --work folder)",
                  in_all=False),
    "shuffle": Bench("bench_shuffle", "shuffle quality and cost on label-sorted stores",
                     ("--quick", "--repeats", "1")),
    "shuffle_keras": Bench("bench_shuffle_keras", "Keras accuracy: default shuffle vs a true one",
                           ("--quick", "--repeats", "1", "--epochs", "2")),
    "shuffle_ranks": Bench("bench_shuffle_ranks", "per-rank shuffle quality (index math)",
                           ("--quick",)),
    "shuffle_design": Bench("bench_shuffle_design", "shuffle quality vs chunk size and budget "
                            "(index math)"),
    "shuffle_pass": Bench("bench_shuffle_pass", "real passes: default shuffle vs sequential",
                          ("--rows", "20000", "--repeats", "1")),
    "layout": Bench("bench_layout", "store layouts: write, read, loader pass, random access",
                    ("--rows", "20000", "--rounds", "1")),
    "gpu": Bench("gpu_check", "can to_dataset feed a GPU (no GPU visible: says so)",
                 ("--rows", "20000", "--rounds", "1")),
    "s3_latency": Bench("bench_s3_latency", "S3 passes at 0/10/30 ms per request vs local disk",
                        ("--rows", "20000")),
    "s3_dask": Bench("bench_s3_dask", "dask column sums from S3 at 0/30 ms per request vs "
                     "local disk, threaded and 2-worker cluster",
                     ("--rows", "20000", "--rounds", "1")),
    "multiworker": Bench("bench_multiworker", "training rows/s: 1 vs 2 processes pinned to a "
                         "core each, per framework", ("--rows", "4000", "--cols", "2000",
                                                      "--repeats", "1", "--epochs", "2",
                                                      # TF's 2-worker start-up alone ~40 s
                                                      "--frameworks", "torch,jax")),
    "peers": Bench("bench_peers", "sparsestore beside annbatch, scDataset and anndata on a "
                   "single-cell-shaped store (peers in --peer-python)",
                   ("--rows", "20000", "--repeats", "1")),
    "reliability": Bench("reliability_report", "faults and hostile input, reliability.md",
                         ("--quick",)),
}


def run(name: str, args: list[str]) -> Any:
    """Call benchmark ``name``'s ``main`` with ``args``."""
    main = importlib.import_module(f"benchmarks.{REGISTRY[name].module}").main
    argv0 = sys.argv
    sys.argv = [f"python -m benchmarks {name}", *args]  # for a main that reads sys.argv
    try:
        return main(args) if inspect.signature(main).parameters else main()
    finally:
        sys.argv = argv0


def run_all(quick: bool) -> int:
    failed = []
    for name, b in REGISTRY.items():
        if not b.in_all:
            print(f"== {name}: skipped ({b.description})")
            continue
        args = list(b.quick) if quick else []
        print(f"== {name} {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = run(name, args)
        except (Exception, SystemExit) as exc:  # one broken benchmark does not stop the rest
            traceback.print_exc()
            rc = exc
        if isinstance(rc, int | BaseException) and rc not in (0, None) and rc is not False:
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"failed: {', '.join(failed)}" if failed else "all ran")
    return 1 if failed else 0


USAGE = __doc__.split("\n\n", 1)[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "list":
        for name, b in REGISTRY.items():
            print(f"{name:15s} {b.description}")
        return 0
    if cmd == "all":
        return run_all("--quick" in rest)
    if cmd == "report":
        from .report import regenerate

        return regenerate(rest)
    if cmd not in REGISTRY:
        print(f"unknown benchmark {cmd!r}; `python -m benchmarks list` names them",
              file=sys.stderr)
        return 2
    rc = run(cmd, rest)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
