"""Exceptions raised by sparsestore.

Every error the library raises on purpose is a :class:`SparseStoreError`, and also
subclasses the builtin a caller would naturally catch (``ValueError``, ``KeyError``...),
so ``except ValueError`` keeps working.  Messages name the problem and the fix.
"""

from __future__ import annotations


class SparseStoreError(Exception):
    """Base class of every error sparsestore raises deliberately."""


class InvalidInputError(SparseStoreError, ValueError):
    """Input data is malformed: wrong rank, bad indptr, out-of-range indices, NaN..."""


class DTypeError(SparseStoreError, TypeError):
    """A dtype cannot be stored (object, string, complex) or does not match the store."""


class ShapeMismatchError(InvalidInputError):
    """Shapes disagree: labels vs rows, appended columns vs the store's columns."""


class StoreExistsError(SparseStoreError, FileExistsError):
    """Refusing to overwrite an existing path without ``overwrite=True``."""


class StoreNotFoundError(SparseStoreError, FileNotFoundError):
    """No store (or no readable source file) at the given path."""


class NotAStoreError(SparseStoreError, ValueError):
    """The path holds something that is not a sparsestore / anndata CSR group."""


class ReadOnlyError(SparseStoreError, PermissionError):
    """A write was attempted on a store opened with ``mode="r"``."""


class CorruptStoreError(SparseStoreError, ValueError):
    """The store's structure is inconsistent (indptr, shape, labels, metadata)."""


class ChecksumError(CorruptStoreError):
    """A chunk's CRC32C does not match its bytes: the chunk is damaged on disk."""


class MissingChunkError(CorruptStoreError):
    """A chunk that committed rows need is absent from storage (deleted or never synced)."""


class MisplacedChunkError(CorruptStoreError):
    """A chunk is intact but is not the one committed at its position (moved, copied from
    another store, or left by a different version of the store)."""


class StoreChangedError(SparseStoreError, RuntimeError):
    """The store was replaced (saved over), or restored to an earlier commit, after this
    handle opened it."""


class NeedsUpgradeError(SparseStoreError, RuntimeError):
    """The store predates the chunk manifest; ``sparsestore upgrade PATH`` adds it."""


class UnverifiedStoreWarning(UserWarning):
    """The opened store has no chunk manifest (written by an older sparsestore, or by
    anndata): a missing, moved or replaced chunk reads as valid data.
    ``sparsestore upgrade PATH`` adds the manifest."""


class ShuffleQualityWarning(UserWarning):
    """A shuffled loader's buffer holds too few of the store's chunk-sized blocks for its
    batches to mix like a permutation (on rows stored sorted, e.g. by label); rewriting the
    store with small chunks in shards (``sparsestore convert OLD NEW --chunk-bytes 128KiB
    --shard-bytes 8MiB``) or a larger ``shuffle_buffer_bytes`` fixes it."""


class OutOfRangeError(SparseStoreError, IndexError):
    """A row or column index is outside the matrix."""


class LabelError(SparseStoreError, KeyError):
    """A label name is unknown, duplicated or otherwise unusable."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class LockError(SparseStoreError, RuntimeError):
    """Another writer holds the store's write lock."""


class UnsafeInputError(InvalidInputError):
    """Input refused for safety: pickled objects, decompression bombs, absurd sizes."""


class FormatError(InvalidInputError):
    """A source file is corrupt, truncated or not in the format its name claims."""


class StorageError(SparseStoreError, OSError):
    """The operating system refused a read or write (full disk, read-only mount...).

    ``errno`` and ``filename`` are those of the refused call; ``str()`` names the store,
    what happened and what to do.
    """

    def __str__(self) -> str:  # the message, without OSError's "[Errno n] ...: 'file'"
        return str(self.strerror) if self.strerror else super().__str__()


class CredentialsError(StorageError, PermissionError):
    """Object storage was reached without credentials (none passed in ``storage_options``
    and none found where its client looks: environment, config files, instance role)."""


class DiskFullError(StorageError):
    """No space left on the device, or the disk quota is used up (ENOSPC, EDQUOT)."""


class FileTooLargeError(StorageError):
    """A file grew past the process's file size limit (RLIMIT_FSIZE) or the file system's."""


class ReadOnlyStorageError(StorageError, PermissionError):
    """The store lives on a read-only file system (EROFS), so it cannot be written."""


class StoreBusyError(StorageError):
    """The path is busy (EBUSY): a mount point or in use, so it cannot be renamed or replaced."""


class LockFileError(StorageError):
    """The store's lock file is a symbolic link, which is refused (it could point anywhere)."""


class LockFileIsDirectoryError(LockFileError, IsADirectoryError):
    """The store's lock file path is a directory, so the store cannot be locked."""


__all__ = [
    "SparseStoreError",
    "InvalidInputError",
    "DTypeError",
    "ShapeMismatchError",
    "StoreExistsError",
    "StoreNotFoundError",
    "NotAStoreError",
    "ReadOnlyError",
    "CorruptStoreError",
    "ChecksumError",
    "MissingChunkError",
    "MisplacedChunkError",
    "StoreChangedError",
    "NeedsUpgradeError",
    "UnverifiedStoreWarning",
    "ShuffleQualityWarning",
    "OutOfRangeError",
    "LabelError",
    "LockError",
    "UnsafeInputError",
    "FormatError",
    "StorageError",
    "CredentialsError",
    "DiskFullError",
    "FileTooLargeError",
    "ReadOnlyStorageError",
    "StoreBusyError",
    "LockFileError",
    "LockFileIsDirectoryError",
]
