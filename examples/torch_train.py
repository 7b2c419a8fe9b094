"""Train a PyTorch model on a sparse store through ``torch.utils.data.DataLoader`` workers.

A learnable synthetic problem (binary labels from a hidden linear model of sparse rows)
is written block by block, then streamed as ``torch.sparse_csr_tensor`` batches by
``sparsestore.adapters.torch.SparseIterableDataset`` with ``num_workers`` processes that each read
their own share of the rows.  The model is a logistic regression whose forward pass is
one sparse-dense product (``x @ W``): the batch is never densified.

    python examples/torch_train.py --rows 100000 --cols 2000 --epochs 3 --workers 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import sparsestore.adapters.torch as sstorch
import torch

import sparsestore

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # noqa: E402


def build_store(path: str | Path, n_rows: int, n_cols: int, density: float = 0.03,
                seed: int = 0) -> sparsestore.SparseStore:
    """The examples' synthetic problem (examples/synthetic.py), without label noise."""
    return synthetic.build_store(path, n_rows, n_cols, density, seed, noise=0.0)


def train(store: sparsestore.SparseStore, epochs: int = 3, workers: int = 2,
          batch_size: int = 256, lr: float = 5.0, seed: int = 0) -> list[float]:
    """Logistic regression by SGD on streamed CSR batches; the mean loss of each epoch."""
    torch.manual_seed(seed)
    loader = sparsestore.DataLoader(store, batch_size, shuffle=True, seed=seed, labels="y")
    ds = sstorch.SparseIterableDataset(loader, num_workers=workers)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                     persistent_workers=False)
    W = torch.zeros(store.n_cols, 1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([W, b], lr=lr)
    losses = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        total, n = 0.0, 0
        for x, y in dl:
            logits = (x @ W).squeeze(1) + b  # sparse CSR @ dense: torch.sparse kernels
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * y.numel()
            n += y.numel()
        losses.append(total / n)
    return losses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--cols", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="demo_data")
    args = p.parse_args(argv)
    store = build_store(Path(args.out) / "torch_train.zarr", args.rows, args.cols)
    t0 = time.perf_counter()
    losses = train(store, args.epochs, args.workers)
    dt = time.perf_counter() - t0
    for epoch, loss in enumerate(losses):
        print(f"epoch {epoch}: loss {loss:.4f}")
    print(f"{args.rows * args.epochs / dt:,.0f} rows/s over {args.epochs} epochs "
          f"({args.workers} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
