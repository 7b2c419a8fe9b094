"""Store errors through TensorFlow, for :mod:`sparsestore.adapters.tensorflow`.

An exception raised inside a ``tf.numpy_function`` comes out as TensorFlow's own error, with
only its text kept.  :func:`_remember` tags a store error on its way in; :func:`unwrap_error`
finds it again from TensorFlow's error; :class:`_StoreErrorsDataset` re-raises it as itself in
Python loops over a :func:`~sparsestore.adapters.tensorflow.to_dataset` pipeline.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections import OrderedDict
from typing import Any

import tensorflow as tf

# The dataset and iterator classes that to_dataset's result extends: private, so a
# TensorFlow release that moves them fails this import at once rather than changing
# behaviour (requirements/ pins the version).
from tensorflow.python.data.ops.dataset_ops import UnaryUnchangedStructureDataset
from tensorflow.python.data.ops.iterator_ops import OwnedIterator
from tensorflow.python.framework import ops

from sparsestore.errors import SparseStoreError

# TensorFlow turns an exception raised in a numpy_function into its own error, keeping only
# the text.  A store error crossing into TensorFlow gets a note with a token (the note is
# part of that text) and is kept here, the last few only, so it can be found again.
_TOKEN = re.compile(r"\[sparsestore error ([0-9a-f]{16})\]")
_RAISED: OrderedDict[str, SparseStoreError] = OrderedDict()
_RAISED_KEEP = 16
_RAISED_LOCK = threading.Lock()


def _remember(exc: BaseException) -> None:
    """Tag a store error that is about to cross into TensorFlow, for :func:`unwrap_error`."""
    if not isinstance(exc, SparseStoreError):
        return
    if any(_TOKEN.search(note) for note in getattr(exc, "__notes__", ())):
        return  # raised again (TensorFlow called once more): already tagged
    token = secrets.token_hex(8)
    exc.add_note(f"[sparsestore error {token}] raised inside TensorFlow, which reports it as "
                 "its own error; sparsestore.adapters.tensorflow.unwrap_error(that error) "
                 "returns this one")
    with _RAISED_LOCK:
        _RAISED[token] = exc
        while len(_RAISED) > _RAISED_KEEP:
            _RAISED.popitem(last=False)


def unwrap_error(error: BaseException) -> SparseStoreError | None:
    """The store error behind a TensorFlow error raised by a :func:`to_dataset` pipeline.

    TensorFlow reports an exception from the adapter's Python side as its own
    ``tf.errors.InvalidArgumentError`` or ``UnknownError``.  A Python loop over the dataset
    re-raises the store's error itself; in graph (``ds.reduce``, ``model.fit``, the dataset
    transformed further) use ``except tf.errors.OpError as e: unwrap_error(e)``, which
    returns the original :class:`~sparsestore.errors.SparseStoreError` (``ChecksumError``,
    ``MissingChunkError``...), or ``None`` when the error did not come from a store (or
    16 later store errors have crossed since: only the last 16 are kept).  Follows
    ``__cause__`` and ``__context__``, so an error wrapped by another library is found too.
    """
    seen: set[int] = set()
    err: BaseException | None = error
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, SparseStoreError):
            return err
        with _RAISED_LOCK:
            for token in _TOKEN.findall(str(getattr(err, "message", None) or err)):
                if token in _RAISED:
                    return _RAISED[token]
        err = err.__cause__ or err.__context__
    return None


class _StoreErrorsIterator(OwnedIterator):
    """TensorFlow's eager iterator, raising a store error as itself (TensorFlow's error as
    its ``__cause__``); the same calls per element as the iterator it replaces."""

    def __next__(self) -> Any:
        try:
            return self._next_internal()
        except tf.errors.OutOfRangeError:
            raise StopIteration from None
        except tf.errors.OpError as exc:
            original = unwrap_error(exc)
            if original is None:
                raise
            raise original from exc


class _StoreErrorsDataset(UnaryUnchangedStructureDataset):
    """The pipeline as it is (the same dataset graph), iterated by
    :class:`_StoreErrorsIterator` in Python loops."""

    def __init__(self, dataset: tf.data.Dataset) -> None:
        super().__init__(dataset, dataset._variant_tensor)

    def __iter__(self) -> Any:
        if not tf.executing_eagerly():  # in a tf.function: TensorFlow raises in graph
            return super().__iter__()
        with ops.colocate_with(self._variant_tensor):  # as tf.data.Dataset.__iter__
            return _StoreErrorsIterator(self)
