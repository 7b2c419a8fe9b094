"""What a small chunk costs to decode: sparsestore's decoder against the codec floor.

``python -m benchmarks chunk_floor [--rows N] [--out DIR]``

Writes the synthetic matrix (100 nnz/row) with 4 MiB chunks and with 1 MiB, 256 KiB and
128 KiB inner chunks in shards, then decodes every chunk of ``data`` and ``indices`` on one
thread (Blosc's own threads off, CPU time, best of 7):

- ``decoder``: :class:`sparsestore.chunks.ChunkDecoder` (read, manifest check, CRC32C,
  Blosc), what the loader pays per chunk;
- ``floor``: CRC32C and Blosc alone on the same bytes already in memory, what any reader of
  that layout pays whatever its Python overhead.

Both are reported per 8 MiB decoded and against the 4 MiB layout: the floor says how close
to the default a small-chunk layout could ever stream, the gap above it what the per-chunk
Python work costs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import machine_info, matrix_blocks, reproduce_command, save_results

LAYOUTS: dict[str, dict[str, Any]] = {
    "4 MiB chunks (default)": {},
    "1 MiB / 16 MiB shards": {"chunk_bytes": 2**20, "shard_bytes": 16 * 2**20},
    "256 KiB / 16 MiB shards": {"chunk_bytes": 2**18, "shard_bytes": 16 * 2**20},
    "128 KiB / 8 MiB shards": {"chunk_bytes": 2**17, "shard_bytes": 8 * 2**20},
}


def _cpu(fn: Any, repeats: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best


def measure(path: Path) -> list[dict[str, Any]]:
    import google_crc32c
    import numcodecs.blosc as nb

    import sparsestore
    from sparsestore import zarr_compat as zc
    from sparsestore.chunks import ChunkDecoder

    store = sparsestore.open(path)
    rows = []
    for name in ("data", "indices"):
        dec = ChunkDecoder(store.arrays[name], name)
        full = -(-dec.size // dec.chunk) - 1  # whole chunks (the last may be short)
        out = np.empty(dec.chunk, dec.dtype)
        # The floor: each chunk's stored bytes, as one plain codec chain would see them.
        codec = zc.blosc_codec(store.arrays[name])
        values = store.arrays[name][: full * dec.chunk]
        encoded = [codec.encode(values[k * dec.chunk:(k + 1) * dec.chunk]) for k in range(full)]

        def decoder(dec: Any = dec, full: int = full, out: np.ndarray = out) -> None:
            for k in range(full):
                dec.decode_into(k, out)

        def floor(encoded: list[Any] = encoded, out: np.ndarray = out) -> None:
            for raw in encoded:
                google_crc32c.value(raw)
                nb.decompress(raw, out)

        nbytes = full * dec.chunk * dec.dtype.itemsize
        per = 8 * 2**20 / nbytes
        rows.append({"array": name, "chunk_bytes": dec.chunk * dec.dtype.itemsize,
                     "chunks": full, "decoder_ms_per_8MiB": _cpu(decoder) * 1e3 * per,
                     "floor_ms_per_8MiB": _cpu(floor) * 1e3 * per})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_chunk_floor",
                                description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = p.parse_args(argv)
    import numcodecs.blosc as nb
    import scipy.sparse as sp

    import sparsestore

    nb.use_threads = False
    X = sp.vstack([b for b, _ in matrix_blocks(args.rows, 30_000, 100)], format="csr")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout, kw in LAYOUTS.items():
            path = Path(tmp) / "s.zarr"
            sparsestore.save(path, X, overwrite=True, **kw)
            for r in measure(path):
                results.append({"layout": layout, **r})
    record = {"command": reproduce_command("benchmarks chunk_floor", p, args, ["rows"]),
              "machine": machine_info(), "args": vars(args), "results": results}
    save_results(record, markdown(record), args.out, "chunk_floor")


def markdown(record: dict[str, Any]) -> str:
    """The page for a ``chunk_floor.json`` record."""
    results, rows = record["results"], record["args"]["rows"]
    base = {r["array"]: r for r in results if r["layout"] == next(iter(LAYOUTS))}
    lines = [
        "# Decode cost per chunk size: sparsestore's decoder against the codec floor", "",
        f"Reproduce: `{record['command']}`", "",
        f"{record['machine']['cpu']}; synthetic {rows:,} x 30,000, 100 nnz/row; one "
        "thread, CPU time, best of 7, ms per 8 MiB decoded.  `floor`: CRC32C + Blosc on "
        "bytes in memory; `decoder`: `ChunkDecoder` (read, manifest check, CRC32C, Blosc).", "",
        "| layout | array | chunks | decoder ms | x default | floor ms | x default |"
        " Python + I/O per chunk (us) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = base[r["array"]]
        per_chunk = (r["decoder_ms_per_8MiB"] - r["floor_ms_per_8MiB"]) * 1e3 \
            * r["chunk_bytes"] / (8 * 2**20)
        lines.append(
            f"| {r['layout']} | {r['array']} | {r['chunks']} | {r['decoder_ms_per_8MiB']:.2f} | "
            f"{r['decoder_ms_per_8MiB'] / b['decoder_ms_per_8MiB']:.2f} | "
            f"{r['floor_ms_per_8MiB']:.2f} | "
            f"{r['floor_ms_per_8MiB'] / b['floor_ms_per_8MiB']:.2f} | {per_chunk:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
