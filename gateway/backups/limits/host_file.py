"""The state the workers of one host share without Redis: a SQLite file in WAL mode.

`<server.state_dir>/limits.sqlite3` (the folder made 0700, the file 0600). Every change is
one short `BEGIN IMMEDIATE` transaction, so a read-then-write (check and reserve, count
and compare) is atomic across the processes that open the file. Each process talks to it
from one thread of its own: the event loop never waits on SQLite's file locks.

`HostFile.in_memory()` is the same schema in this process's memory: the stand-in while
Redis cannot answer, when there is no file to share.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from aiohttp import web

from ...config_loader import ConfigError

T = TypeVar("T")

FILE_NAME = "limits.sqlite3"
# a writer waits this long for another process's transaction (each lasts microseconds)
BUSY_SECONDS = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    system_key TEXT NOT NULL,
    organization_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_system ON reservations (system_key);
CREATE INDEX IF NOT EXISTS reservations_by_organization ON reservations (organization_id);
-- reservations of uploads whose commit has been sent (a table of its own: a file made by
-- an earlier version gains it without a migration)
CREATE TABLE IF NOT EXISTS landing (
    id TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS releases (
    scope TEXT PRIMARY KEY,
    generation INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counts (
    key TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS counts_by_expiry ON counts (expires_at);
"""


class HostFile:
    def __init__(self, database: str, shared: bool) -> None:
        self.shared = shared  # False: this process's memory only
        # memory answers at once: only the file, locked by other processes, may make a wait
        self._thread = concurrent.futures.ThreadPoolExecutor(1, "host-file") if shared else None
        self._connection = _connect(database)

    @classmethod
    def at(cls, state_dir: Path) -> HostFile:
        """Open (creating) the host's file; ConfigError naming `server.state_dir` when it
        cannot be used, so start-up stops rather than letting every limit multiply by the
        workers."""
        path = state_dir / FILE_NAME
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # made 0600 before SQLite opens it: its -wal and -shm files take its mode
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            return cls(str(path), shared=True)
        except OSError as exc:
            raise ConfigError("server.state_dir", f"cannot use {path}: {exc.strerror}") from None
        except sqlite3.Error as exc:
            raise ConfigError("server.state_dir", f"cannot use {path}: {exc}") from None

    @classmethod
    def in_memory(cls) -> HostFile:
        return cls(":memory:", shared=False)

    async def transaction(self, change: Callable[[sqlite3.Connection], T]) -> T:
        """Run `change` in one immediate transaction, in this file's thread. Cancelling the
        caller does not cancel the transaction: it commits or rolls back whole."""
        if self._thread is None:
            return self._run(change)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._run, change)

    def _run(self, change: Callable[[sqlite3.Connection], T]) -> T:
        with _immediate(self._connection):
            return change(self._connection)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown()  # after the transactions already handed to it
        self._connection.close()


def _connect(database: str) -> sqlite3.Connection:
    connection = sqlite3.connect(
        database, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=False
    )
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        # limits need atomicity, not durability across a power cut: WAL's NORMAL syncs only
        # at checkpoints and still never corrupts the file
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.executescript(_SCHEMA)  # IF NOT EXISTS: workers starting at once agree
    except BaseException:
        connection.close()
        raise
    return connection


@contextlib.contextmanager
def _immediate(connection: sqlite3.Connection) -> Iterator[None]:
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


HOST_FILE = web.AppKey("host_file", HostFile)
