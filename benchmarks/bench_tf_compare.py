"""Issue 3's TensorFlow throughput ratios, interleaved in one process (the fairest
comparison on a shared machine): sparsestore's sequential and shuffled ``to_dataset``
against TensorFlow's in-memory ``from_tensor_slices(SparseTensor).batch`` and a
``from_generator`` building COO from scipy, on the same matrix.  Each round times one pass
of each (iterator teardown excluded, as in ``benchmarks.run``); medians are reported::

    python -m benchmarks.bench_tf_compare /tmp/work/store.zarr [rounds]

(the store of a ``benchmarks.run`` setup; the in-memory matrix is read from it).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

from .baselines import coo_signature, csr_batches, to_sparse_tensor
from .common import BATCH_SIZE, coo_parts


def main(argv: list[str]) -> dict[str, Any]:
    if not argv:
        raise SystemExit(__doc__)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    import adapters.tensorflow as sstf
    import sparsestore

    rounds = int(argv[1]) if len(argv) > 1 else 5
    store = sparsestore.open(argv[0])
    X = store[:]
    idx, vals, shape = coo_parts(X)
    cases = {
        "from_tensor_slices": tf.data.Dataset.from_tensor_slices(
            tf.sparse.SparseTensor(idx, vals, shape)).batch(BATCH_SIZE).prefetch(tf.data.AUTOTUNE),
        "from_generator": tf.data.Dataset.from_generator(
            lambda: csr_batches(X, BATCH_SIZE), output_signature=coo_signature(tf, X.dtype)
        ).map(to_sparse_tensor(tf)).prefetch(tf.data.AUTOTUNE),
        "ours_sequential": sstf.to_dataset(sparsestore.DataLoader(store, BATCH_SIZE)),
        "ours_shuffled": sstf.to_dataset(
            sparsestore.DataLoader(store, BATCH_SIZE, shuffle=True, seed=0)),
    }
    del idx, vals
    for ds in cases.values():  # trace and warm every pipeline once
        next(iter(ds))
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, ds in cases.items():
            it = iter(ds)
            t0 = time.perf_counter()
            for _b in it:
                pass
            times[k].append(time.perf_counter() - t0)
            del it
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{X.shape[0]:,} x {X.shape[1]:,}, {X.nnz:,} nnz, batch {BATCH_SIZE}; "
          f"median of {rounds} interleaved rounds; load average {os.getloadavg()}")
    for k, s in med.items():
        print(f"  {k:20s} {X.nnz / s / 1e6:8.1f} M nnz/s")
    ratios = {
        "sequential_vs_from_tensor_slices": med["from_tensor_slices"] / med["ours_sequential"],
        "sequential_vs_from_generator": med["from_generator"] / med["ours_sequential"],
        "shuffled_vs_sequential": med["ours_sequential"] / med["ours_shuffled"],
    }
    for k, v in ratios.items():
        print(f"  {k:34s} {v:.2f}x")
    return {"seconds": med, "ratios": ratios}


if __name__ == "__main__":
    main(sys.argv[1:])
