"""Train with PyTorch DistributedDataParallel on several processes, each streaming its rows.

Launched by torchrun, one process per rank (gloo: CPU only, loopback or a real network):

    python -m torch.distributed.run --nproc_per_node 2 examples/torch_ddp.py \\
        --store demo_data/ddp.zarr --rows 20000 --epochs 2 --workers 2 --out demo_data/ddp

Each rank builds ``sparsestore.DataLoader(store, ...)`` *without* ``rank``/``world_size``:
``SparseIterableDataset`` takes them from ``torch.distributed`` (as torch's
``DistributedSampler`` does), so rank ``r`` of ``w`` reads only its ``1/w`` of the rows, and
its ``--workers`` torch DataLoader workers split that share again.  DDP averages the
gradients, so with equal batches on every rank a step equals one step of a single process
on the union of the ranks' batches.

``--checkpoint-every N`` saves the model, the optimizer and the dataset's position
(``ds.state_dict(batches_seen=...)``, the same on every rank) to ``OUT/checkpoint.pt``; a
relaunch with the same arguments resumes from it mid-epoch, serving exactly the rows not yet
trained on.  For a store on object storage pass ``--storage-options`` (JSON for fsspec,
e.g. ``{"endpoint_url": "...", "key": "...", "secret": "..."}``; without it s3fs finds
credentials as boto3 does: environment, ``~/.aws``, instance role).

``OUT`` also receives what the tests check: ``rows-rank<r>.jsonl`` (the row ids of each
step, from a ``row`` label when the store has one), ``chunks-<pid>.jsonl`` (the storage
chunks each worker decoded per pass) and ``model.npz`` (the final weights, from rank 0);
``epochs-rank<r>.jsonl`` holds each epoch's wall time, input wait, steps and rows (for the
multi-process benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import sparsestore.adapters.torch as sstorch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import sparsestore

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # noqa: E402
from run_log import (  # noqa: E402
    MemoryInput,
    Waited,
    add_resume_arguments,
    add_training_arguments,
    log_epoch,
)


class ReportingLoader(sparsestore.DataLoader):
    """A loader that appends, after each complete pass, the chunks it decoded to a file.

    Shards made by ``shard`` (one per torch worker) report too: that is how each
    rank's share of the store's bytes is measured, in the processes that read them.
    """

    report_dir: str | None = None

    def with_shard(self, rank: int, world_size: int) -> sparsestore.DataLoader:
        other = super().with_shard(rank, world_size)
        other.__class__ = ReportingLoader
        other.report_dir = self.report_dir
        return other

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "report_dir": self.report_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.report_dir = state.pop("report_dir")
        super().__setstate__(state)

    def iter_converted(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        # What SparseIterableDataset (and ``for x in loader``) iterate: the pass, converted.
        epoch = self.epoch
        yield from super().iter_converted(*args, **kwargs)
        if self.report_dir:
            index, count = self.sub_shards[-1] if self.sub_shards else (0, 1)
            line = {"rank": int(os.environ.get("RANK", 0)), "shard": self.rank * count + index,
                    "shards": self.world_size * count, "epoch": epoch,
                    "decoded": self.decoded_chunks}
            with open(Path(self.report_dir) / f"chunks-{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")


class LogReg(torch.nn.Module):
    """Logistic regression whose forward pass is one sparse-dense product (no densifying)."""

    def __init__(self, n_cols: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n_cols, 1))
        self.b = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.w).squeeze(1) + self.b


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename: a kill never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(args: argparse.Namespace) -> list[float]:
    """The DDP training loop; returns this rank's mean loss of each epoch it ran."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    opts = json.loads(args.storage_options) if args.storage_options else None
    if rank == 0 and args.rows and not args.storage_options and not Path(args.store).exists():
        synthetic.build_store(args.store, args.rows, args.cols, density=0.03, noise=0.0)
    dist.barrier()  # the store exists before any rank opens it
    store = sparsestore.open(args.store, storage_options=opts)
    labels = ("y", "row") if "row" in store.labels else ("y",)
    # No rank/world_size here: the dataset takes them from torch.distributed.  drop_last:
    # every rank runs the same number of steps (DDP's all-reduce needs every rank).
    loader = ReportingLoader(store, args.batch_size, shuffle=args.shuffle, seed=args.seed,
                             labels=labels, drop_last=True, num_workers=1)
    loader.report_dir = str(out)
    ds = sstorch.SparseIterableDataset(loader, num_workers=args.workers)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=args.workers)
    torch.manual_seed(0)
    model = DistributedDataParallel(LogReg(store.n_cols))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)

    ckpt, first_epoch, done = out / "checkpoint.pt", 0, 0
    rows_log = out / f"rows-rank{rank}.jsonl"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        ds.load_state_dict(state["data"])
        first_epoch, done = state["data"]["epoch"], state["data"]["batches_seen"]
        step = state["step"]
        if rows_log.exists():  # forget steps trained after the checkpoint: they run again
            kept = [ln for ln in rows_log.read_text().splitlines()
                    if json.loads(ln)["step"] <= step]
            rows_log.write_text("".join(ln + "\n" for ln in kept))
        print(f"rank {rank}: resumed at epoch {first_epoch}, batch {done}", flush=True)
    else:
        step = 0
        rows_log.unlink(missing_ok=True)

    losses, memory = [], MemoryInput()
    with open(rows_log, "a") as log:
        for epoch in range(first_epoch, args.epochs):
            if epoch != first_epoch or done == 0:
                ds.set_epoch(epoch)
                done = 0
            total, n, steps0 = 0.0, 0, step
            source = memory(dl, len(dl)) if args.memory_input else dl
            batches, t_epoch = Waited(source), time.perf_counter()
            for x, y, *rest in batches:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
                opt.zero_grad()
                loss.backward()  # DDP: gradients averaged over the ranks here
                opt.step()
                done, step = done + 1, step + 1
                total, n = total + loss.item() * y.numel(), n + y.numel()
                if rest:
                    log.write(json.dumps({"epoch": epoch, "batch": done, "step": step,
                                          "rows": rest[0].tolist()}) + "\n")
                    log.flush()
                if args.checkpoint_every and step % args.checkpoint_every == 0:
                    if rank == 0:
                        save_atomic({"model": model.module.state_dict(),
                                     "optimizer": opt.state_dict(), "step": step,
                                     "data": ds.state_dict(batches_seen=done)}, ckpt)
                    dist.barrier()  # every rank is past the checkpoint before going on
                    if step == args.crash_at_step and rank == world - 1:
                        os.kill(os.getpid(), signal.SIGKILL)  # a worker dying mid-epoch
            log_epoch(out, rank, epoch, time.perf_counter() - t_epoch, batches.seconds,
                      step - steps0, n)
            losses.append(total / max(1, n))
    if rank == 0:
        m = model.module
        np.savez(out / "model.npz", w=m.w.detach().numpy()[:, 0], b=m.b.detach().numpy())
    dist.destroy_process_group()
    return losses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_arguments(p, "rank", "demo_data/ddp")
    add_resume_arguments(p)
    p.add_argument("--workers", type=int, default=2, help="torch DataLoader workers per rank")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    losses = train(args)
    dt = time.perf_counter() - t0
    rank = int(os.environ.get("RANK", 0))
    for i, loss in enumerate(losses):
        print(f"rank {rank} epoch {i}: loss {loss:.4f}")
    print(f"rank {rank}: {dt:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
