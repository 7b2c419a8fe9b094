"""Train a logistic regression in plain JAX (no optax) on BCOO batches streamed from a store.

A learnable synthetic problem (binary labels from a hidden linear model of sparse rows)
is written block by block, then read by ``sparsestore.adapters.jax.sharded_loader`` (this process's
rows when JAX runs several) with ``pad_nnz=True`` so the jit-compiled step sees a few
padded shapes instead of one per batch, and staged onto the device by
``sparsestore.adapters.jax.prefetch_to_device``.  The step is hand-written SGD on ``jax.grad``.

    python examples/jax_train.py --rows 100000 --cols 2000 --epochs 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import sparsestore.adapters.jax as ssjax

import sparsestore

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # noqa: E402


def build_store(path: str | Path, n_rows: int, n_cols: int, density: float = 0.03,
                seed: int = 0) -> sparsestore.SparseStore:
    """The examples' synthetic problem (examples/synthetic.py), without label noise."""
    return synthetic.build_store(path, n_rows, n_cols, density, seed, noise=0.0)


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean binary cross-entropy of ``sigmoid(x @ w + b)``; ``x`` a BCOO batch."""
    logits = (x @ params["w"]) + params["b"]
    return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)


@jax.jit
def sgd_step(params: dict[str, jax.Array], x: jax.Array, y: jax.Array, lr: float
             ) -> tuple[dict[str, jax.Array], jax.Array]:
    """One SGD step: new parameters and the batch loss."""
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss


def train(store: sparsestore.SparseStore, epochs: int = 3, batch_size: int = 256,
          lr: float = 5.0, seed: int = 0) -> list[float]:
    """SGD over streamed BCOO batches; the mean loss of each epoch."""
    loader = ssjax.sharded_loader(store, backend=ssjax.JaxBackend(pad_nnz=True),
                                  batch_size=batch_size, shuffle=True, seed=seed, labels="y",
                                  drop_last=True)  # fixed rows: few shapes to compile
    params = {"w": jnp.zeros(store.n_cols, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    losses = []
    for _ in range(epochs):  # each pass is the loader's next epoch: a new shuffle
        total = []
        for x, y in ssjax.prefetch_to_device(loader, size=2):
            params, loss = sgd_step(params, x, y, lr)
            total.append(loss)
        losses.append(float(jnp.mean(jnp.stack(total))))
    return losses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--cols", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default="demo_data")
    args = p.parse_args(argv)
    store = build_store(Path(args.out) / "jax_train.zarr", args.rows, args.cols)
    t0 = time.perf_counter()
    losses = train(store, args.epochs)
    dt = time.perf_counter() - t0
    for epoch, loss in enumerate(losses):
        print(f"epoch {epoch}: loss {loss:.4f}")
    print(f"{args.rows * args.epochs / dt:,.0f} rows/s over {args.epochs} epochs on "
          f"{jax.devices()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
