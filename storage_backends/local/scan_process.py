"""One process of a walk of a large local root in several (DESIGN.md §13, issue #31).

A process's first scan reads every backup's size, one fstatat each, and Python's steps a
name cost as much again: on one core that is twice `find`'s time. The folders are
independent, so the walk is shared among processes by a hash of each folder's name
(`scan.share_of`), one a core: each lists the root's folders (a small part of the work)
and reads its own share in full. A process, not a thread: the walk is Python code, which
the interpreter's lock runs one thread at a time.

    python -P -m storage_backends.local.scan_process ROOT SHARE SHARES

(-P: never the working directory's modules, only the gateway's own, on PYTHONPATH.)

It writes frames to stdout, each a 4-byte length (`scan.FRAME`) and a JSON array:
["batch", rows] for each batch (`scan.packed` summaries: plain arrays), then ["done", odd
names] or ["failed", why]. JSON, not pickle: what the gateway reads back can never run
code. An interrupt from the terminal is the gateway's to handle: ignored here, the gateway
ends the process when it stops reading. Nothing imports this module: it is the process's
main (imported by the package first, `-m` would run a second copy of it).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any, BinaryIO

from ..base import FolderSummary
from ..errors import StorageError
from . import scan
from .scan import FRAME, packed


def _send(out: BinaryIO, frame: tuple[str, Any]) -> None:
    data = json.dumps(frame, separators=(",", ":")).encode()
    out.write(FRAME.pack(len(data)) + data)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    root, share, shares = Path(argv[0]), int(argv[1]), int(argv[2])
    out = sys.stdout.buffer
    odd: list[str] = []
    try:
        try:
            for batch in scan.walk(root, None, odd, share, shares):
                _send(out, ("batch", [packed(s) for s in batch if isinstance(s, FolderSummary)]))
            _send(out, ("done", odd))
        except StorageError as exc:
            _send(out, ("failed", str(exc)))
        except Exception as exc:  # the gateway logs it: its stderr is not kept
            _send(out, ("failed", f"scan process: {type(exc).__name__}: {exc}"))
        out.flush()
    except BrokenPipeError:  # the gateway stopped reading: the walk is no one's now
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
