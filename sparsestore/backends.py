"""Backend plugins: turn a compact :class:`~sparsestore.batch.Batch` into framework objects.

Backends are found by name in the ``sparsestore.backends`` entry-point group (the
TensorFlow one lives in ``sparsestore.adapters.tensorflow``); ``numpy`` is built in and works even
without installed metadata.

A backend works in two steps (:class:`Backend`), so that the costly one leaves the
training loop's thread:

* ``host(batch, loader) -> parts``: numpy work only (casts, COO coordinates through
  :func:`sparsestore.kernels.coo_into`, which releases the GIL where numba is installed).
  It must be thread-safe: the loader runs it on its pass's stage threads
  (:mod:`sparsestore.engine`), ``prefetch`` batches ahead of the consumer.
* ``wrap(parts, loader) -> object``: the framework objects (tensors, sparse matrices), in
  the consumer's thread, in order.

A backend written for the one-step contract, with only ``convert(batch, loader)``, still
works: its ``convert`` is the ``wrap`` of the raw batch (no host step, so it runs wholly
in the consumer's thread).  :class:`TwoStepBackend` gives a two-step backend that
``convert`` too, for callers converting single batches.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import InvalidInputError

if TYPE_CHECKING:
    from .batch import Batch
    from .loader import DataLoader

GROUP = "sparsestore.backends"
_EXTRAS = {"tensorflow": "tf", "jax": "jax", "torch": "torch"}  # backend -> pip extra


@runtime_checkable
class Backend(Protocol):
    """The backend contract: ``host`` (numpy, any thread) then ``wrap`` (framework, consumer)."""

    name: str

    def host(self, batch: Batch, loader: DataLoader) -> Any:
        """What ``wrap`` needs (numpy arrays, in any structure); must be thread-safe."""
        ...

    def wrap(self, parts: Any, loader: DataLoader) -> Any:
        """The element the loader yields, from ``host``'s parts, in the consumer's thread."""
        ...


@runtime_checkable
class ConvertBackend(Protocol):
    """The one-step contract of earlier releases, still accepted: ``convert`` is the wrap of
    the raw batch, run in the consumer's thread."""

    name: str

    def convert(self, batch: Batch, loader: DataLoader) -> Any: ...


class TwoStepBackend:
    """Base for two-step backends: ``convert(batch, loader)`` is ``wrap(host(batch))``."""

    name: str

    def host(self, batch: Batch, loader: DataLoader) -> Any:
        raise NotImplementedError

    def wrap(self, parts: Any, loader: DataLoader) -> Any:
        raise NotImplementedError

    def convert(self, batch: Batch, loader: DataLoader) -> Any:
        """One batch through both steps, in the calling thread."""
        return self.wrap(self.host(batch, loader), loader)


HostStep = Callable[["Batch", "DataLoader"], Any]
WrapStep = Callable[[Any, "DataLoader"], Any]


def steps(backend: Any) -> tuple[HostStep | None, WrapStep]:
    """A backend's ``(host, wrap)``: ``host`` is ``None`` for a convert-only backend, whose
    ``convert`` then wraps the raw batch."""
    host, wrap = getattr(backend, "host", None), getattr(backend, "wrap", None)
    if callable(host) and callable(wrap):
        return host, wrap
    return None, backend.convert


class NumpyBackend(TwoStepBackend):
    """scipy CSR batches (ndarray for dense stores), as ``(X, labels...)`` with labels.

    The whole conversion is host work (scipy is not a framework with a thread of its
    own): ``host`` builds the matrix, ``wrap`` hands it on.
    """

    name = "numpy"

    def host(self, batch: Batch, loader: DataLoader) -> Any:
        if batch.dense is not None:
            x: Any = batch.dense
        else:
            x = batch.to_scipy()
        if loader.label_names:
            return (x, *batch.labels)
        return x

    def wrap(self, parts: Any, loader: DataLoader) -> Any:
        return parts


def available_backends() -> list[str]:
    """Names a ``DataLoader(backend=...)`` accepts: the built-in and the registered ones."""
    names = {"numpy"}
    names.update(ep.name for ep in entry_points(group=GROUP))
    return sorted(names)


def get_backend(name_or_obj: Any) -> Backend | ConvertBackend:
    """A backend instance from a registered name, a backend object or a backend class."""
    if not isinstance(name_or_obj, str):
        obj = name_or_obj() if isinstance(name_or_obj, type) else name_or_obj
        two_step = callable(getattr(obj, "host", None)) and callable(getattr(obj, "wrap", None))
        if not two_step and not callable(getattr(obj, "convert", None)):
            raise InvalidInputError(
                f"backend {name_or_obj!r} has neither host(batch, loader) and wrap(parts, "
                f"loader) nor convert(batch, loader); pass a backend name "
                f"({', '.join(available_backends())}) or an object implementing Backend"
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


__all__ = ["GROUP", "Backend", "ConvertBackend", "NumpyBackend", "TwoStepBackend",
           "available_backends", "get_backend", "steps"]
