"""The local backend's I/O process: walks, unlinks and fsyncs on behalf of a gateway process.

Why a process: the event loop must never wait on the disk, and CPython threads cannot
take that work off it cheaply — every syscall a pool thread makes hands the GIL back
and forth with the busy loop thread, which under load cost as much CPU as the fsyncs
themselves. This process has its own interpreter and runs on another core; the gateway
exchanges one message with it per event-loop iteration, however many deletes that
covers, and a hung disk stalls this process, never the gateway.

Protocol, over a Unix stream socket, one ASCII line per message:

    request   "<seq> D <organization_id> <system_key> <backup_id>\\n"   delete
              "<seq> P <organization_id> <system_key> <backup_id>\\n"   delete unless
                                        protected, under the folder's shared lock
              "<seq> L <organization_id> <system_key>\\n"               list a folder
              "<seq> N <organization_id> <system_key> <limit>\\n"       its newest, totals
              "<seq> E <organization_id> <system_key>\\n"               its ids and sizes
              "<seq> R\\n"                                              readiness probe
    answer    "<seq> <code> <detail>\\n"   code: ok | missing | symlink | failed, and
              for P: protected | busy (an exclusive holder has the lock: nothing done)
              (a listing's detail is its entries as one line of JSON)
              a delete that unlinked is told so at once ("<seq> unlinked -"; for P its
              detail is the backup's size), then answered ok or failed once its
              folder's fsync is done

Every component was validated by the gateway (safe path components, backup-id grammar),
and is checked again here: nothing with a separator or a slash is ever used as a path.

Batches are group commits: the requests that arrived together are unlinked, then every
folder they touched is fsynced once (several folders at once, from a few threads), then
their deletes are answered. The fsync rounds run in a committer thread, one after
another; requests that arrive during a round are read and unlinked meanwhile and join the
next round, so an fsync always starts after the unlinks it covers. Answers that need no
fsync (missing, symlink, failed, readiness) go out at once, never behind any folder's
fsync. Listings run in their own threads (a folder of a million backups takes seconds to
scan): deletes are read, unlinked and answered meanwhile, and a listing gives up at the
operation timeout rather than scan on for an answer nobody waits for.

Nothing a request or the disk holds makes this process exit: an unexpected error in one
request is logged and answered `failed`; the process serves on.

The process ignores SIGINT and SIGTERM (it starts with them blocked, so there is no
window): a service manager signals the whole group, and the gateway still needs this
process to finish its in-flight deletes during its grace period. It exits when the
gateway closes the socket (end of file), after answering what it has read.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from ..base import BackupLocation, SystemFolder
from ..errors import BackupNotFound, BackupProtected, StorageUnavailable
from ..log_format import LOG_FORMAT_ENV, JsonFormatter, TextFormatter
from .fs import (
    SymlinkRefused,
    check_root_sync,
    encode_entries,
    encode_listing,
    encode_newest,
    fsync_folder,
    list_entries,
    list_folder,
    list_newest,
    open_root,
    unlink_backup,
)
from .state import FolderBusy, unlink_unless_protected

log = logging.getLogger("storage_backends.local.io_process")

_COMPONENT = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_READ_SIZE = 1 << 18
_LIMIT = re.compile(rb"[0-9]{1,9}")
# listings at once: a few tenants' big folders may scan together, deletes go on beside them
LIST_THREADS = 2
A = TypeVar("A")
R = TypeVar("R")


def _location(parts: list[bytes]) -> BackupLocation | None:
    if len(parts) != 3 or not all(_COMPONENT.fullmatch(p) for p in parts):
        return None
    org, key, backup = (p.decode("ascii") for p in parts)
    return BackupLocation(org, key, backup)


def _folder(parts: list[bytes]) -> SystemFolder | None:
    if len(parts) != 2 or not all(_COMPONENT.fullmatch(p) for p in parts):
        return None
    org, key = (p.decode("ascii") for p in parts)
    return SystemFolder(org, key)


# per folder: (seq, open folder fd) of each delete that unlinked there
_Unlinked = dict[tuple[str, str], list[tuple[bytes, int]]]


class Batch:
    """One round: unlink everything asked, fsync each touched folder once, answer."""

    def __init__(
        self,
        root: Path,
        fsync: bool,
        threads: int,
        timeout: float = 10.0,
        send: Callable[[list[bytes]], None] | None = None,
    ) -> None:
        self._root = root
        self._fsync = fsync
        self._threads = threads
        self._timeout = timeout
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="fsync") if threads > 1 else None
        )
        # listings answer from their own threads, through `send`
        self._send = send
        self._listers = ThreadPoolExecutor(LIST_THREADS, thread_name_prefix="list")

    def unlink(self, lines: Iterable[bytes]) -> tuple[list[bytes], _Unlinked]:
        """The round's first half: answers that need no fsync (probes, listings, missing,
        symlink, failed), and the folders to fsync before the rest may be answered."""
        early: list[bytes] = []
        deletes: list[tuple[bytes, BackupLocation, bool]] = []
        for line in lines:
            seq, _, rest = line.partition(b" ")
            op, _, args = rest.partition(b" ")
            if op == b"R":
                early.append(self._probe(seq))
                continue
            if op in (b"L", b"N", b"E"):
                self._list_later(seq, op, args, early)
                continue
            location = _location(args.split(b" ")) if op in (b"D", b"P") else None
            if location is None:
                early.append(seq + b" failed malformed request\n")
            else:
                deletes.append((seq, location, op == b"P"))
        if not deletes:
            return early, {}
        try:
            root_fd = open_root(self._root)
        except StorageUnavailable as exc:
            failed = b" failed " + _detail(str(exc)) + b"\n"
            return early + [seq + failed for seq, _, _ in deletes], {}
        try:
            unlink = functools.partial(_unlink_one, root_fd)
            if self._pool is not None and len(deletes) > 1:
                # On a disk that discards freed blocks, an unlink waits ~0.1 ms for the
                # device: several at once overlap those waits.
                outcomes = self._in_chunks(unlink, deletes)
            else:
                outcomes = [unlink(d) for d in deletes]
        finally:
            os.close(root_fd)
        folders: _Unlinked = {}
        for (seq, location, _), outcome in zip(deletes, outcomes, strict=True):
            if isinstance(outcome, bytes):
                early.append(outcome)
            else:
                # told at once, so that a slow fsync is never mistaken for a failed delete
                fd, size = outcome
                early.append(seq + b" unlinked " + (b"-" if size < 0 else b"%d" % size) + b"\n")
                folder = (location.organization_id, location.system_key)
                folders.setdefault(folder, []).append((seq, fd))
        return early, folders

    def _in_chunks(self, work: Callable[[A], R], items: list[A]) -> list[R]:
        """`[work(i) for i in items]`, spread over the pool in one contiguous share a thread:
        as many unlinks or fsyncs in flight at once as with one job per item, without a
        future and a GIL hand-off per item (this process's user CPU: ~65 -> ~40 us a delete).
        """
        assert self._pool is not None
        share = -(-len(items) // min(self._threads, len(items)))
        parts = [items[i : i + share] for i in range(0, len(items), share)]
        return [r for part in self._pool.map(functools.partial(_each, work), parts) for r in part]

    def close(self) -> None:
        self._listers.shutdown(wait=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _list_later(self, seq: bytes, op: bytes, args: bytes, early: list[bytes]) -> None:
        """Run a listing in a lister thread, answered when done; without `send` (a caller
        that only wants this round's answers) at once, in `early`."""
        deadline = time.monotonic() + self._timeout
        if self._send is None:
            early.append(self._list(seq, op, args, deadline))
            return
        job = self._listers.submit(self._list, seq, op, args, deadline)
        job.add_done_callback(self._answer_listing)

    def _answer_listing(self, job: Future[bytes]) -> None:
        assert self._send is not None
        with contextlib.suppress(*_GONE):  # the gateway went away: nobody to answer
            self._send([job.result()])

    def _list(self, seq: bytes, op: bytes, args: bytes, deadline: float) -> bytes:
        parts = args.split(b" ")
        limit = 0
        if op == b"N":
            if len(parts) != 3 or not _LIMIT.fullmatch(parts[2]):
                return seq + b" failed malformed request\n"
            limit = int(parts.pop())
        folder = _folder(parts)
        if folder is None:
            return seq + b" failed malformed request\n"
        try:
            if op == b"N":
                answer = encode_newest(list_newest(self._root, folder, limit, deadline))
            elif op == b"E":
                answer = encode_entries(list_entries(self._root, folder, deadline))
            else:
                answer = encode_listing(list_folder(self._root, folder, deadline))
            return seq + b" ok " + answer + b"\n"
        except SymlinkRefused:
            return seq + b" symlink -\n"
        except StorageUnavailable as exc:
            return seq + b" failed " + _detail(str(exc)) + b"\n"
        except Exception:
            # whatever a folder holds, this process serves on (and the bug is in the log)
            log.exception("listing %s/%s failed", folder.organization_id, folder.system_key)
            return seq + b" failed listing failed unexpectedly\n"

    def _probe(self, seq: bytes) -> bytes:
        try:
            check_root_sync(self._root)
        except StorageUnavailable as exc:
            return seq + b" failed " + _detail(str(exc)) + b"\n"
        return seq + b" ok -\n"

    def commit(self, unlinked: _Unlinked) -> list[bytes]:
        """The round's second half: fsync each folder once, then the answers of its deletes."""
        folders = list(unlinked.values())
        if not folders:
            return []
        if not self._fsync:
            outcomes: list[str | None] = [None] * len(folders)
        elif self._pool is None or len(folders) == 1:
            outcomes = [fsync_folder(fds(f)) for f in folders]
        else:
            # Several folders at once: their flushes reach the disk together instead of
            # one after another (a round of 36 folders: 12.5 ms in turn, 5.4 ms at once).
            outcomes = self._in_chunks(fsync_folder, [fds(f) for f in folders])
        answers = []
        for waiters, error in zip(folders, outcomes, strict=True):
            for seq, fd in waiters:
                if not self._fsync:
                    os.close(fd)
                if error is None:
                    answers.append(seq + b" ok -\n")
                else:
                    answers.append(seq + b" failed " + _detail(error) + b"\n")
        return answers


def _unlink_one(
    root_fd: int, request: tuple[bytes, BackupLocation, bool]
) -> tuple[int, int] | bytes:
    """The folder's fd (to fsync) and the backup's size (-1: not looked at) when unlinked,
    else the answer to send."""
    seq, location, unless_protected = request
    try:
        if unless_protected:
            return unlink_unless_protected(root_fd, location)
        return unlink_backup(root_fd, location), -1
    except BackupProtected:
        return seq + b" protected -\n"
    except FolderBusy:
        return seq + b" busy -\n"
    except SymlinkRefused:
        return seq + b" symlink -\n"
    except BackupNotFound:
        return seq + b" missing -\n"
    except StorageUnavailable as exc:
        return seq + b" failed " + _detail(str(exc)) + b"\n"
    except Exception:
        # whatever the disk holds, this process serves on (and the bug is in the log)
        log.exception("delete of %s failed", location.relative_key)
        return seq + b" failed delete failed unexpectedly\n"


def _each(work: Callable[[A], R], items: list[A]) -> list[R]:
    return [work(item) for item in items]


def fds(waiters: list[tuple[bytes, int]]) -> list[int]:
    return [fd for _, fd in waiters]


def _detail(text: str) -> bytes:
    return text.encode("ascii", "replace").replace(b"\n", b" ") or b"-"


def serve(
    sock: socket.socket, root: Path, fsync: bool, threads: int, timeout: float = 10.0
) -> None:
    """Read requests and answer what needs no fsync at once; a committer thread runs the
    fsync rounds one after another and answers their deletes. Requests that arrive while
    a round runs are unlinked meanwhile and join the next round together: every fsync
    still starts after the unlinks it covers."""
    sending = threading.Lock()
    rounds: queue.SimpleQueue[_Unlinked | None] = queue.SimpleQueue()

    def send(answers: list[bytes]) -> None:
        if answers:
            with sending:
                sock.sendall(b"".join(answers))

    batch = Batch(root, fsync, threads, timeout, send)

    def committer() -> None:
        with contextlib.suppress(*_GONE):
            done = False
            while not done:
                unlinked = rounds.get()
                if unlinked is None:
                    return
                while True:  # what queued up meanwhile joins this round
                    try:
                        more = rounds.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        done = True
                        break
                    for folder, waiters in more.items():
                        unlinked.setdefault(folder, []).extend(waiters)
                send(batch.commit(unlinked))

    worker = threading.Thread(target=committer, name="commit", daemon=True)
    worker.start()
    try:
        _read_requests(sock, batch, send, rounds)
    finally:
        rounds.put(None)  # the rounds queued so far still run and are answered
        worker.join()
        batch.close()  # and the listings under way (each ends by its deadline)


def _read_requests(
    sock: socket.socket,
    batch: Batch,
    send: Callable[[list[bytes]], None],
    rounds: queue.SimpleQueue[_Unlinked | None],
) -> None:
    pending = b""
    eof = False
    while not eof:
        chunk = sock.recv(_READ_SIZE)
        if not chunk:
            break
        data = [pending, chunk]
        while True:  # everything already queued joins this round
            try:
                more = sock.recv(_READ_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if not more:
                eof = True
                break
            data.append(more)
        lines = b"".join(data).split(b"\n")
        pending = lines.pop()
        # 404s, probes and listings never wait for any folder's fsync
        early, unlinked = batch.unlink(lines)
        send(early)
        if unlinked:
            rounds.put(unlinked)


# BrokenPipe/ConnectionReset: the gateway went away; nobody is left to answer.
_GONE = (BrokenPipeError, ConnectionResetError)


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    # the gateway's own layout, with this process named (`process: local-io`)
    text = os.environ.get(LOG_FORMAT_ENV, "json") == "text"
    handler.setFormatter(
        TextFormatter(process="local-io") if text else JsonFormatter(process="local-io")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    _configure_logging()
    fd, root, fsync, threads = int(args[0]), Path(args[1]), args[2] == "1", int(args[3])
    timeout = float(args[4]) if len(args) > 4 else 10.0  # listings give up after it
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    # The gateway spawned us with both blocked; one that arrived meanwhile is now dropped.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    with socket.socket(fileno=fd) as sock, contextlib.suppress(*_GONE):
        serve(sock, root, fsync, threads, timeout)


if __name__ == "__main__":
    main()
