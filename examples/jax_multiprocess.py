"""Data-parallel logistic regression on several JAX processes, each streaming its own rows.

NOT RUN in this repository's tests (JAX is not installed where they run): a sketch of the
wiring, written against ``jax.distributed`` and ``jax.experimental.multihost_utils``.

One process per host (or per CPU process on one machine), each told the coordinator:

    python examples/jax_multiprocess.py --store demo_data/jax_mp.zarr --rows 20000 \\
        --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 0 &
    python examples/jax_multiprocess.py --store demo_data/jax_mp.zarr \\
        --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 1

``ssjax.sharded_loader`` sets ``rank=jax.process_index()`` and
``world_size=jax.process_count()``: each process reads its ``1/n`` of the rows.  Each step
averages the processes' gradients (``process_allgather`` + mean), so it equals one step on
the union of their batches; ``drop_last=True`` keeps the step counts equal (every process
must join every all-gather).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import sparsestore.adapters.jax as ssjax
from jax.experimental import multihost_utils

import sparsestore

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # noqa: E402


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean binary cross-entropy of ``sigmoid(x @ w + b)``; ``x`` a BCOO batch."""
    logits = (x @ params["w"]) + params["b"]
    return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)


grad_fn = jax.jit(jax.value_and_grad(loss_fn))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--storage-options", default=None, help="fsspec options, as JSON")
    p.add_argument("--rows", type=int, default=0)
    p.add_argument("--cols", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256, help="per process")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--coordinator", required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    args = p.parse_args(argv)
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    opts = json.loads(args.storage_options) if args.storage_options else None
    if jax.process_index() == 0 and args.rows and not Path(args.store).exists():
        synthetic.build_store(args.store, args.rows, args.cols, density=0.03, noise=0.0)
    multihost_utils.sync_global_devices("store written")
    store = sparsestore.open(args.store, storage_options=opts)
    loader = ssjax.sharded_loader(store, backend=ssjax.JaxBackend(pad_nnz=True),
                                  batch_size=args.batch_size, labels="y", drop_last=True)
    params = {"w": jnp.zeros(store.n_cols, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        losses = []
        for x, y in ssjax.prefetch_to_device(loader, size=2):
            loss, grads = grad_fn(params, x, y)
            # every process's gradients, stacked on a new leading axis, then averaged
            grads = jax.tree.map(lambda g: jnp.mean(g, axis=0),
                                 multihost_utils.process_allgather(grads))
            params = jax.tree.map(lambda q, g: q - args.lr * g, params, grads)
            losses.append(loss)
        print(f"process {jax.process_index()} epoch {epoch}: "
              f"loss {float(jnp.mean(jnp.stack(losses))):.4f}")
    print(f"process {jax.process_index()}: {time.perf_counter() - t0:.1f} s")
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
