"""A PostgreSQL failure said with its cause, where the driver leaves the cause out.

A DSN's `sslrootcert` that is not there fails in the ssl module as `FileNotFoundError: [Errno
2] No such file or directory`, naming no file: `check-config --probe` and the server's log
said only that, and the operator was left to guess which of the DSN's files it was.
"""

from __future__ import annotations

import os
import urllib.parse

# The DSN's files (libpq's names, as asyncpg reads them) and the variables that stand in
# for them: a missing one surfaces from the ssl module as a FileNotFoundError naming no file.
_DSN_FILES = {
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
}


def described_failure(exc: BaseException, dsn: str | None) -> str:
    """`postgres: Type: text`, and for a file that is not there, which one."""
    text = f"postgres: {type(exc).__name__}: {exc}"
    if isinstance(exc, FileNotFoundError) and exc.filename is None and dsn:
        params = urllib.parse.parse_qs(urllib.parse.urlsplit(dsn).query)
        for name, variable in _DSN_FILES.items():
            path = (params.get(name) or [os.environ.get(variable, "")])[-1]
            if path and not os.path.exists(path):
                text += f" (the {name} file {path})"
    return text
