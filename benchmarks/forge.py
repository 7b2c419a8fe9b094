"""Helpers that edit stores behind sparsestore's back, shared by tests and the reliability
report (never by the library)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import zarr


def unseal(path: Path) -> None:
    """Drop the manifest, as a store written before it existed (format version 1) looks:
    such a store is read unverified."""
    g = zarr.open_group(str(path), mode="r+")
    meta = dict(g.attrs["sparsestore"])
    meta.update(format_version=1)
    meta.pop("manifest")
    meta.pop("generation")
    g.attrs["sparsestore"] = meta


def bomb(path: Path, n_bytes: int) -> None:
    """A scipy .npz whose ``data`` member inflates to ``n_bytes`` of zeros (a ~1000x bomb)."""
    n = n_bytes // 8
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (n,)}
    )
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("data.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            zeros = bytes(2**22)
            for _ in range(n_bytes // len(zeros)):
                f.write(zeros)
        for name, arr in (("indices", np.zeros(n, np.int32)[:0]), ("indptr", np.array([0, 0])),
                          ("format", np.array("csr")), ("shape", np.array([1, n]))):
            buf = io.BytesIO()
            np.save(buf, arr)
            zf.writestr(f"{name}.npy", buf.getvalue())
