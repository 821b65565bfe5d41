"""Typed storage errors. The HTTP layer maps each to one status in one place."""


class StorageError(Exception):
    """Base of every error a backend raises on purpose."""


class BackupNotFound(StorageError):
    """The backup object does not exist (or is unreachable by policy, e.g. behind a symlink)."""


class StorageUnavailable(StorageError):
    """The store could not be reached, timed out, or answered an error.

    The message is for logs only; it may name storage internals and must never
    reach a response body.
    """


class StorageNotConfigured(StorageError):
    """The gateway runs with the `none` backend."""


class InsufficientStorage(StorageError):
    """The store is full (ENOSPC, EDQUOT, or the store's own answer): a 507."""


class UploadIncomplete(StorageError):
    """The upload's body ended, or its client went away, before the announced size."""


class ChecksumRefused(StorageError):
    """The store computed the body's checksum and it is not the one the upload named
    (S3's BadDigest): the appliance's bytes were not these, a 400, nothing stored."""


class BackupProtected(StorageError):
    """The backup is protected (DESIGN.md §11): a delete left it in place."""


class DeleteOutcomeUnknown(StorageError):
    """The backup was removed (a retry reads 404), but its removal is not known to be
    durable: the folder's fsync failed or did not finish in time. Never "failed"."""
