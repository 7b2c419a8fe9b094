"""Train with TensorFlow's MultiWorkerMirroredStrategy: one process per worker, TF_CONFIG.

Start one process per worker, each with the same cluster in ``TF_CONFIG`` and its own
task index (CPU only here; loopback or a real network):

    for i in 0 1; do
      TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:20001", "127.0.0.1:20002"]},
                  "task": {"type": "worker", "index": '$i'}}' \\
      python examples/tf_multiworker.py --store demo_data/tfmw.zarr --rows 20000 \\
          --checkpoint-every 50 --out demo_data/tfmw &
    done; wait

Worker ``i`` of ``n`` builds ``DataLoader(store, ..., rank=i, world_size=n)`` and reads only
its ``1/n`` of the rows; ``strategy.distribute_datasets_from_function`` takes its
``to_dataset(loader)`` as worker ``i``'s input pipeline (no ``input_context`` there: the
loader is already this worker's share, and keeping it this loader, not a ``shard`` copy,
is what lets ``loader.load_state_dict`` resume it mid-epoch).  ``sstf.distribute(strategy,
loader)`` with an unsharded loader reads the same rows in the same order, but its
per-worker copy always starts at an epoch's start.

Training is a custom loop (``strategy.run``): Keras 3.15's ``model.fit`` cannot take a
dataset distributed over several workers (it reduces a first batch to build the model and
fails with ``ValueError: Attempt to convert a value (PerReplica:{...}) with an unsupported
type``).  The model is logistic regression on the ``SparseTensor`` batches
(``tf.sparse.sparse_dense_matmul``, never densified) with Keras' SGD, whose
``apply_gradients`` sums the replicas' gradients: each worker's loss is its batch's summed
loss divided by the *global* batch, so a step is one SGD step on the mean loss of the
union of the workers' batches.

MWMS runs a collective in every step, so every worker must run the same number of steps:
the loader drops each worker's last partial batch (``drop_last=True``) and, when
``n_rows`` is not a multiple of ``n * batch``, reads only the first ``n_rows - n_rows %
(n * batch)`` rows (``rows=``): every worker then has the same number of full batches,
and those last rows are never read.

``--checkpoint-every N``: worker 0 writes the weights and the optimizer
(``tf.train.Checkpoint``) and, beside them in ``OUT/checkpoint/state.json``, its
``loader.state_dict()`` set to the batches trained on (not those read ahead), then all
workers meet in a collective, so no worker runs past a checkpoint that is not on disk.  A
relaunch of the same commands restores them: equal shares and equal steps make that one
position every worker's, so each loads the same state and serves exactly the batches not
yet trained on.  When a worker dies the others block in their next collective: stop them
and relaunch all.  Object storage: ``--storage-options`` (JSON for fsspec).

``OUT`` also receives what the tests check: ``rows-rank<i>.jsonl`` (the row ids of each
step, from a ``row`` label), ``chunks-<pid>.jsonl`` (the storage chunks each worker decoded
per complete pass) and ``model.npz`` (the final weights, from worker 0);
``epochs-rank<i>.jsonl`` holds each epoch's wall time, input wait, steps and rows (for the
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import sparsestore.adapters.tensorflow as sstf  # noqa: E402
import tensorflow as tf  # noqa: E402

import sparsestore  # noqa: E402
from sparsestore.batch import Batch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # noqa: E402
from run_log import (  # noqa: E402
    Waited,
    add_resume_arguments,
    add_training_arguments,
    log_epoch,
)


class ReportingLoader(sparsestore.DataLoader):
    """A loader that appends, after each complete pass, the chunks it decoded to a file:
    how each worker's share of the store's bytes is measured, in the process reading it."""

    report_dir: str | None = None

    def iter_batches(self) -> Iterator[Batch]:
        epoch = self.epoch
        yield from super().iter_batches()
        if self.report_dir:
            line = {"rank": self.rank, "shard": self.rank, "shards": self.world_size,
                    "epoch": epoch, "decoded": self.decoded_chunks}
            with open(Path(self.report_dir) / f"chunks-{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")


class SparseLogReg(keras.layers.Layer):
    """Logistic regression logits of ``SparseTensor`` rows: one sparse-dense product."""

    def build(self, input_shape: Any) -> None:
        self.w = self.add_weight(shape=(input_shape[-1], 1), initializer="zeros", name="w")
        self.b = self.add_weight(shape=(1,), initializer="zeros", name="b")

    def call(self, x: Any) -> Any:
        return tf.sparse.sparse_dense_matmul(x, self.w)[:, 0] + self.b


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a kill never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def train(args: argparse.Namespace) -> tuple[int, list[tuple[int, float]]]:
    """The MWMS training loop; returns this worker's index and the mean loss of each epoch
    it ran."""
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    resolver = strategy.cluster_resolver
    index = resolver.task_id
    workers = resolver.cluster_spec().num_tasks("worker")
    out = Path(args.out)
    opts = json.loads(args.storage_options) if args.storage_options else None
    if index == 0 and args.rows and not opts and not Path(args.store).exists():
        synthetic.build_store(args.store, args.rows, args.cols, density=0.03, noise=0.0)
    while True:  # worker 0 may still be writing it: wait for its last commit
        try:
            store = sparsestore.open(args.store, storage_options=opts)
        except sparsestore.errors.SparseStoreError:
            store = None
        if store is not None and (opts or not args.rows or store.n_rows >= args.rows):
            break
        time.sleep(0.5)
    labels = ("y", "row") if "row" in store.labels else ("y",)
    global_batch = args.batch_size * workers
    tail = store.n_rows % global_batch
    rows = None if tail == 0 else np.arange(store.n_rows - tail)  # equal shares
    loader = ReportingLoader(store, args.batch_size, shuffle=args.shuffle, seed=args.seed,
                             labels=labels, drop_last=True, rows=rows, rank=index,
                             world_size=workers, num_workers=1)
    loader.report_dir = str(out)
    steps = len(loader)
    if {len(loader.with_shard(r, workers)) for r in range(workers)} != {steps}:
        raise SystemExit("workers would run different numbers of steps")

    with strategy.scope():
        model = SparseLogReg()
        model.build((None, store.n_cols))
        optimizer = keras.optimizers.SGD(args.lr)
        optimizer.build(model.trainable_variables)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)

    @tf.function
    def train_step(batch: Any) -> tf.Tensor:
        def step(x: tf.SparseTensor, y: tf.Tensor, *_rest: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                per_row = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)
                # Summed over the replicas by apply_gradients: the global batch's mean.
                loss = tf.reduce_sum(per_row) / global_batch
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        return strategy.reduce("SUM", strategy.run(step, args=batch), axis=None)

    @tf.function
    def barrier() -> tf.Tensor:
        return strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        # One input pipeline per worker, this one's: the loader is already its share.
        assert (ctx.input_pipeline_id, ctx.num_input_pipelines) == (index, workers)
        ds = sstf.to_dataset(loader, prefetch=2)
        # --memory-input: the first batches again and again, from tf.data's cache
        return ds.take(4).cache().repeat().take(steps) if args.memory_input else ds

    ckpt_dir = out / "checkpoint"
    rows_log = out / f"rows-rank{index}.jsonl"
    first_epoch = step = 0
    if (ckpt_dir / "state.json").exists():
        saved = json.loads((ckpt_dir / "state.json").read_text())
        ckpt.read(str(ckpt_dir / saved["prefix"])).assert_consumed()
        loader.load_state_dict(saved["loader"])  # the same position on every worker
        first_epoch, step = loader.position.epoch, saved["step"]
        if rows_log.exists():  # forget steps trained after the checkpoint: they run again
            kept = [ln for ln in rows_log.read_text().splitlines()
                    if json.loads(ln)["step"] <= step]
            write_atomic(rows_log, "".join(ln + "\n" for ln in kept))
        print(f"worker {index}: resumed at epoch {first_epoch}, batch "
              f"{loader.position.batches_consumed}", flush=True)
    else:
        rows_log.unlink(missing_ok=True)
        loader.set_epoch(0)

    def checkpoint(epoch: int, done: int) -> None:
        if index == 0:
            prefix = f"step-{step}"
            ckpt.write(str(ckpt_dir / prefix))
            state = loader.state_dict()  # counts batches read ahead: set to those trained
            if done == steps:
                epoch, done = epoch + 1, 0
            state.update(epoch=epoch, batches_consumed=done)
            old = json.loads((ckpt_dir / "state.json").read_text())["prefix"] \
                if (ckpt_dir / "state.json").exists() else None
            write_atomic(ckpt_dir / "state.json",
                         json.dumps({"step": step, "prefix": prefix, "loader": state}))
            for f in ckpt_dir.glob(f"{old}.*") if old else ():
                f.unlink()
        barrier()  # every worker is past the checkpoint before any goes on

    losses = []
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with open(rows_log, "a") as log:
        for epoch in range(first_epoch, args.epochs):
            done = 0 if args.memory_input else loader.position.batches_consumed
            total, done0 = 0.0, done
            batches = Waited(strategy.distribute_datasets_from_function(dataset_fn))
            t_epoch = time.perf_counter()
            for batch in batches:
                loss = train_step(batch)
                done, step = done + 1, step + 1
                total += float(loss)
                if len(batch) > 2:
                    ids = np.concatenate([t.numpy() for t in
                                          strategy.experimental_local_results(batch[2])])
                    log.write(json.dumps({"epoch": epoch, "batch": done, "step": step,
                                          "rows": ids.tolist()}) + "\n")
                    log.flush()
                if args.checkpoint_every and step % args.checkpoint_every == 0:
                    checkpoint(epoch, done)
                    if step == args.crash_at_step and index == workers - 1:
                        os.kill(os.getpid(), signal.SIGKILL)  # a worker dying mid-epoch
            if done != steps:
                raise RuntimeError(f"epoch {epoch} ended after {done} of {steps} batches")
            log_epoch(out, index, epoch, time.perf_counter() - t_epoch, batches.seconds,
                      done - done0, (done - done0) * args.batch_size)
            losses.append((epoch, total / steps))
    if index == 0:
        w, b = model.get_weights()
        np.savez(out / "model.npz", w=w[:, 0], b=b)
    return index, losses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_arguments(p, "worker", "demo_data/tfmw")
    add_resume_arguments(p)
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    index, losses = train(args)
    dt = time.perf_counter() - t0
    for epoch, loss in losses:
        print(f"worker {index} epoch {epoch}: loss {loss:.4f}")
    print(f"worker {index}: {dt:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
