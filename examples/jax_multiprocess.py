"""Data-parallel logistic regression on several JAX processes, each streaming its own rows.

One process per host (or several CPU processes on one machine), each told the coordinator
(CPU: ``jax.distributed`` runs the cross-process collectives over gloo):

    for i in 0 1; do
      python examples/jax_multiprocess.py --store demo_data/jax_mp.zarr --rows 20000 \\
          --coordinator 127.0.0.1:12355 --num-processes 2 --process-id $i --out demo_data/jax_mp &
    done; wait

``ssjax.sharded_loader`` sets ``rank=jax.process_index()`` and
``world_size=jax.process_count()``: each process reads its ``1/n`` of the rows.  Each step
averages the processes' gradients (``process_allgather`` + mean), so it equals one step on
the union of their batches.  Each process's loss is its own batch's mean, so the average
of the processes' gradients is the gradient of the global batch's mean only because every
process's batches have the same size: ``drop_last=True`` drops each process's last
partial batch and, when ``n_rows`` is not a multiple of ``n * batch``, the loader reads
only the first ``n_rows - n_rows % (n * batch)`` rows (``rows=``), so all processes run
the same number of full steps (every process must join every all-gather) and those last
rows are never read.

``OUT`` receives what ``tests/test_multiworker.py`` checks, in the formats of the torch and
TensorFlow examples: ``rows-rank<i>.jsonl`` (the row ids of each step, from a ``row``
label when the store has one), ``chunks-<pid>.jsonl`` (the storage chunks each process
decoded per epoch, ``loader.decoded_chunks``) and ``model.npz`` (the final weights, from
process 0); ``epochs-rank<i>.jsonl`` holds each epoch's wall time, input wait, steps and rows
(for the multi-process benchmark).  Object storage: ``--storage-options`` (JSON for fsspec).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import sparsestore.adapters.jax as ssjax
from jax.experimental import multihost_utils

import sparsestore

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # noqa: E402
from run_log import MemoryInput, Waited, add_training_arguments, log_epoch  # noqa: E402


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean binary cross-entropy of ``sigmoid(x @ w + b)``; ``x`` a BCOO batch."""
    logits = (x @ params["w"]) + params["b"]
    return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)


grad_fn = jax.jit(jax.value_and_grad(loss_fn))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_arguments(p, "process", "demo_data/jax_mp")
    p.add_argument("--label", default="y", help="the store's label to fit (0/1)")
    p.add_argument("--coordinator", required=True, help="HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    args = p.parse_args(argv)
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    index, world = jax.process_index(), jax.process_count()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    opts = json.loads(args.storage_options) if args.storage_options else None
    if index == 0 and args.rows and not opts and not Path(args.store).exists():
        synthetic.build_store(args.store, args.rows, args.cols, density=0.03, noise=0.0)
    multihost_utils.sync_global_devices("store written")
    store = sparsestore.open(args.store, storage_options=opts)

    # Equal shares of full batches: every process runs the same steps on equal batches.
    tail = store.n_rows % (args.batch_size * world)
    rows = None if tail == 0 else np.arange(store.n_rows - tail)
    labels = (args.label, "row") if "row" in store.labels else (args.label,)
    loader = ssjax.sharded_loader(store, backend=ssjax.JaxBackend(pad_nnz=True),
                                  batch_size=args.batch_size, labels=labels, drop_last=True,
                                  rows=rows)
    params = {"w": jnp.zeros(store.n_cols, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    step, memory = 0, MemoryInput()
    t0 = time.perf_counter()
    with open(out / f"rows-rank{index}.jsonl", "w") as rows_log, \
            open(out / f"chunks-{os.getpid()}.jsonl", "w") as chunks_log:
        for epoch in range(args.epochs):  # each pass advances the loader's epoch
            losses, n = [], 0
            source = ssjax.prefetch_to_device(loader, size=2)
            batches = Waited(memory(source, len(loader)) if args.memory_input else source)
            t_epoch = time.perf_counter()
            for batch, (x, y, *ids) in enumerate(batches, 1):
                loss, grads = grad_fn(params, x, y)
                # every process's gradients, stacked on a new leading axis, then averaged
                grads = jax.tree.map(lambda g: jnp.mean(g, axis=0),
                                     multihost_utils.process_allgather(grads))
                params = jax.tree.map(lambda q, g: q - args.lr * g, params, grads)
                losses.append(loss)
                step, n = step + 1, n + y.shape[0]
                if ids:
                    rows_log.write(json.dumps({"epoch": epoch, "batch": batch, "step": step,
                                               "rows": np.asarray(ids[0]).tolist()}) + "\n")
            log_epoch(out, index, epoch, time.perf_counter() - t_epoch, batches.seconds,
                      len(losses), n)
            # the chunks this process decoded in the pass just finished: its share of bytes
            chunks_log.write(json.dumps({"rank": index, "shard": index, "shards": world,
                                         "epoch": epoch,
                                         "decoded": loader.decoded_chunks}) + "\n")
            print(f"process {index} epoch {epoch}: "
                  f"loss {float(jnp.mean(jnp.stack(losses))):.4f}", flush=True)
    print(f"process {index}: {time.perf_counter() - t0:.1f} s", flush=True)
    if index == 0:
        np.savez(out / "model.npz", w=np.asarray(params["w"]),
                 b=np.asarray(params["b"]).reshape(1))
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
