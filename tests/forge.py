"""Helpers that edit stores behind sparsestore's back, shared by tests and the reliability
report (never by the library)."""

from __future__ import annotations

from pathlib import Path

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
