"""Backend plugins: turn a compact :class:`~sparsestore.batch.Batch` into framework objects.

Backends are found by name in the ``sparsestore.backends`` entry-point group (the
TensorFlow one lives in ``sparsestore.adapters.tensorflow``); ``numpy`` is built in and works even
without installed metadata.  A backend is any object with a ``name`` and a
``convert(batch, loader)`` method.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import scipy.sparse as sp

from .errors import InvalidInputError

if TYPE_CHECKING:
    from .batch import Batch
    from .loader import DataLoader

GROUP = "sparsestore.backends"
_EXTRAS = {"tensorflow": "tf", "jax": "jax", "torch": "torch"}  # backend -> pip extra


@runtime_checkable
class Backend(Protocol):
    """What a backend provides: a name and a batch converter."""

    name: str

    def convert(self, batch: Batch, loader: DataLoader) -> Any: ...


class NumpyBackend:
    """scipy CSR batches (ndarray for dense stores), as ``(X, labels...)`` with labels."""

    name = "numpy"

    def convert(self, batch: Batch, loader: DataLoader) -> Any:
        if batch.dense is not None:
            x: Any = batch.dense
        else:
            x = sp.csr_matrix(
                (batch.values, batch.indices, batch.row_splits), shape=(batch.n_rows, batch.n_cols)
            )
            x.has_canonical_format = True  # the reader guarantees sorted, unique indices
        if loader.label_names:
            return (x, *batch.labels)
        return x


def available_backends() -> list[str]:
    """Names a ``DataLoader(backend=...)`` accepts: the built-in and the registered ones."""
    names = {"numpy"}
    names.update(ep.name for ep in entry_points(group=GROUP))
    return sorted(names)


def get_backend(name_or_obj: Any) -> Backend:
    """A backend instance from a registered name, a backend object or a backend class."""
    if not isinstance(name_or_obj, str):
        obj = name_or_obj() if isinstance(name_or_obj, type) else name_or_obj
        if not callable(getattr(obj, "convert", None)):
            raise InvalidInputError(
                f"backend {name_or_obj!r} has no convert(batch, loader) method; pass a backend "
                f"name ({', '.join(available_backends())}) or an object implementing Backend"
            )
        return obj
    eps = [ep for ep in entry_points(group=GROUP) if ep.name == name_or_obj]
    if not eps:
        if name_or_obj == "numpy":
            return NumpyBackend()
        raise InvalidInputError(
            f"unknown backend {name_or_obj!r}; available backends: "
            f"{', '.join(available_backends())} (plugins register in the {GROUP!r} entry-point "
            "group)"
        )
    try:
        target = eps[0].load()
    except ImportError as exc:
        raise InvalidInputError(
            f"backend {name_or_obj!r} could not be loaded ({exc}); install its framework: "
            f"pip install 'sparsestore[{_EXTRAS.get(name_or_obj, name_or_obj)}]'"
        ) from exc
    return target() if isinstance(target, type) else target


__all__ = ["Backend", "GROUP", "NumpyBackend", "available_backends", "get_backend"]
