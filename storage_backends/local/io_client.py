"""The gateway's end of the local I/O process (see `io_process`): spawn, talk, notice death.

Requests made during one event-loop iteration leave in one send(); answers are read as
they come and resolve their futures. The loop thread never blocks on the disk and never
shares the GIL with a thread that waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import StorageUnavailable

log = logging.getLogger(__name__)

_READ_SIZE = 1 << 18
_RESPAWN_INTERVAL = 1.0  # a process that keeps dying is not restarted more often than this
_MODULE = "storage_backends.local.io_process"
_SHIELDED = {signal.SIGTERM, signal.SIGINT}
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])

Answer = tuple[bytes, bytes]  # (code, detail)


class LocalIoProcess:
    def __init__(self, root: Path, fsync: bool, threads: int, timeout: float) -> None:
        # the timeout too: a listing there gives up when nobody waits for its answer any more
        self._args = [str(root), "1" if fsync else "0", str(threads), repr(timeout)]
        self._timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        # seq -> (future, deadline); oldest first, since every request has the same budget
        self._pending: dict[int, tuple[asyncio.Future[Answer], float]] = {}
        # deletes the process has unlinked, waiting for their fsync: no operation deadline
        # any more (the request's own deadline bounds them), only the process's life
        self._applied: dict[int, asyncio.Future[Answer]] = {}
        self._on_applied: dict[int, Callable[[bytes], None]] = {}
        self._expiry: asyncio.TimerHandle | None = None  # armed for the oldest deadline
        self._seq = itertools.count(1)
        self._outbox: list[bytes] = []
        self._unsent = b""
        self._flush_scheduled = False
        self._writer_registered = False
        self._inbox = b""
        self._spawned_at = -_RESPAWN_INTERVAL
        self._progress = 0.0  # loop time of the last answer (or of the first wait after none)
        self._closing = False
        self._gone = asyncio.Event()  # set when the current process is lost

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._sock is not None else None

    def start(self) -> None:
        self._spawn()

    def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        self._spawned_at = loop.time()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        # The child imports this package from where this process found it, whatever its cwd.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_PARENT, env.get("PYTHONPATH")]))
        # Born with SIGTERM and SIGINT blocked (a mask survives exec), so a signal to the whole
        # group in the instant before the child ignores them cannot kill it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SHIELDED)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", _MODULE, str(child.fileno()), *self._args],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            parent.close()
            raise StorageUnavailable(f"local I/O process cannot start: {exc.strerror}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            child.close()
        parent.setblocking(False)
        self._sock = parent
        self._gone = asyncio.Event()
        self._inbox = self._unsent = b""
        loop.add_reader(parent.fileno(), self._on_readable)
        log.debug("local I/O process %d started", self._proc.pid)

    def request(
        self, message: bytes, on_applied: Callable[[bytes], None] | None = None
    ) -> asyncio.Future[Answer]:
        """Queue one request ("D org key id" or "R"); the future resolves with its answer,
        or fails with StorageUnavailable when the process dies or the timeout passes.

        A delete that the process has unlinked calls `on_applied` at once, with the
        detail of its "unlinked" answer; from then on it waits for its fsync without the
        operation timeout."""
        loop = asyncio.get_running_loop()
        if self._sock is None:
            if self._closing or loop.time() - self._spawned_at < _RESPAWN_INTERVAL:
                raise StorageUnavailable("local I/O process is not running")
            self._spawn()
        seq = next(self._seq)
        future: asyncio.Future[Answer] = loop.create_future()
        now = loop.time()
        if not self._pending:
            self._progress = now
        self._pending[seq] = (future, now + self._timeout)
        if on_applied is not None:
            self._on_applied[seq] = on_applied
        if self._expiry is None:
            self._expiry = loop.call_at(now + self._timeout, self._expire)
        self._outbox.append(b"%d %s\n" % (seq, message))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._sock is None:
            return
        self._unsent += b"".join(self._outbox)
        self._outbox.clear()
        self._send()

    def _send(self) -> None:
        assert self._sock is not None
        try:
            sent = self._sock.send(self._unsent)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(f"send failed: {exc.strerror}")
            return
        self._unsent = self._unsent[sent:]
        loop = asyncio.get_running_loop()
        if self._unsent and not self._writer_registered:
            loop.add_writer(self._sock.fileno(), self._send)
            self._writer_registered = True
        elif not self._unsent and self._writer_registered:
            loop.remove_writer(self._sock.fileno())
            self._writer_registered = False

    def _on_readable(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(f"receive failed: {exc.strerror}")
            return
        if not data:
            self._lost("exited")
            return
        lines = (self._inbox + data).split(b"\n")
        self._inbox = lines.pop()
        self._progress = asyncio.get_running_loop().time()
        for line in lines:
            seq_text, code, detail = line.split(b" ", 2)
            seq = int(seq_text)
            if code == b"unlinked":
                entry = self._pending.pop(seq, None)
                if entry is not None:
                    self._applied[seq] = entry[0]
                    notify = self._on_applied.pop(seq, None)
                    if notify is not None:
                        notify(detail)
                continue
            self._on_applied.pop(seq, None)
            future = self._applied.pop(seq, None)
            if future is None:
                entry = self._pending.pop(seq, None)
                future = entry[0] if entry is not None else None
            if future is not None and not future.done():
                future.set_result((code, detail))

    def _lost(self, why: str) -> None:
        """The process is gone or unusable: fail what waits on it; the next request respawns."""
        sock, self._sock = self._sock, None
        self._gone.set()
        # Requests not yet sent die with their futures: none may reach the next process.
        self._outbox.clear()
        self._unsent = b""
        if sock is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(sock.fileno())
            if self._writer_registered:
                loop.remove_writer(sock.fileno())
                self._writer_registered = False
            sock.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()  # reaped by subprocess' own bookkeeping once it has exited
        if not self._closing:
            log.warning("local I/O process %s; %d operations failed", why, len(self._pending))
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        pending, self._pending = self._pending, {}
        applied, self._applied = self._applied, {}
        self._on_applied.clear()
        for future in [f for f, _ in pending.values()] + list(applied.values()):
            if not future.done():
                future.set_exception(StorageUnavailable(f"local I/O process {why}"))

    def _expire(self) -> None:
        """Fail the requests whose time is up (one timer for all, not one per request).

        If the process has answered nothing for as long, it is hung (a stuck disk):
        abandon it, so the next request gets a fresh one."""
        self._expiry = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._pending:
            seq, (future, deadline) = next(iter(self._pending.items()))
            if deadline > now:
                self._expiry = loop.call_at(deadline, self._expire)
                return
            if now - self._progress >= self._timeout and self._sock is not None:
                self._lost(f"answered nothing for {self._timeout:g}s")
                return
            del self._pending[seq]
            self._on_applied.pop(seq, None)
            if not future.done():
                future.set_exception(StorageUnavailable("local storage operation timed out"))

    async def close(self) -> None:
        """Finish: the process answers what it has read, sees end of file and exits."""
        self._closing = True
        if self._sock is not None:
            self._flush()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)
            # its end of file arrives once it has answered everything and exited
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await self._gone.wait()
        if self._sock is not None:
            self._lost("stopped")
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1)  # one stuck in the kernel on a dead disk is left to exit later
