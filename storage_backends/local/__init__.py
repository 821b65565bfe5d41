"""The `local` backend: backups on a POSIX disk, walked with directory fds, deleted durably.

Its modules are private to it: the store, the blocking filesystem steps (`fs`), the I/O
process (`io_process`, run as `python -m storage_backends.local.io_process`) and the
gateway's end of it (`io_client`). From outside, import this package only. Its modules may
import `storage_backends.base` and `storage_backends.errors`.
"""

from .fs import ROOT_MARKER, SIDECAR_SUFFIX, SymlinkRefused, folds_case, mark_root
from .store import LocalBackupStore, LocalConfig

__all__ = [
    "ROOT_MARKER",
    "SIDECAR_SUFFIX",
    "LocalBackupStore",
    "LocalConfig",
    "SymlinkRefused",
    "folds_case",
    "mark_root",
]
