"""Fault injection for tests that run real processes: on PYTHONPATH only in those tests.

GATEWAY_TEST_FSYNC_DELAY=<seconds> makes every os.fsync of a folder sleep that long before
the real fsync, in the gateway and in its local I/O process alike (the I/O process inherits
the environment): a slow disk, without a slow disk.
"""

from __future__ import annotations

import os
import stat
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

_delay = float(os.environ.get("GATEWAY_TEST_FSYNC_DELAY", "0") or 0)
if _delay > 0:
    _real_fsync = os.fsync

    def _slow_fsync(fd: FileDescriptorLike) -> None:
        if stat.S_ISDIR(os.fstat(fd if isinstance(fd, int) else fd.fileno()).st_mode):
            time.sleep(_delay)
        _real_fsync(fd)

    os.fsync = _slow_fsync
