"""The local I/O process: its protocol and group commit (run in a thread here, so its own
code can be spied on), and the gateway's handling of a process that dies, hangs or is
signalled (real spawned processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.backups.storage import STORE
from storage_backends import StorageUnavailable
from storage_backends.local import fs as local_fs
from storage_backends.local import io_process as local_io
from storage_backends.local.io_client import LocalIoProcess

from .support import (
    LocalHarness,
    eventually,
    free_port,
    http,
    location_for,
    new_backup_id,
    scraped_is,
    serve_gateway,
    token_for,
    wait_for_port,
    wait_until,
)
from .support import delete_as as delete
from .test_operations import write_config


class RecordingSocket(socket.socket):
    """The process's end of the socket, noting when each answer leaves."""

    events: list[tuple[str, str]]

    def sendall(self, data: Any, flags: int = 0) -> None:
        self.events.append(("send", bytes(data).decode()))
        super().sendall(data, flags)


class Peer:
    """The gateway's side of the protocol, talking to `local_io.serve` in a thread."""

    def __init__(self, root: Path, events: list[tuple[str, str]], fsync: bool = True) -> None:
        self.sock, theirs = socket.socketpair()
        self.sock.settimeout(10)  # a served side that died fails the test instead of hanging it
        served = RecordingSocket(fileno=theirs.detach())
        served.events = events
        self.thread = threading.Thread(target=local_io.serve, args=(served, root, fsync, 4))
        self.thread.start()
        self.served = served
        self.buffer = b""
        self.unlinked: list[str] = []

    def ask(self, *lines: str) -> dict[str, str]:
        self.sock.sendall("".join(line + "\n" for line in lines).encode())
        answers: dict[str, str] = {}
        while len(answers) < len(lines):
            chunk = self.sock.recv(65536)
            assert chunk, "the I/O process closed the socket"
            parts = (self.buffer + chunk).split(b"\n")
            self.buffer = parts.pop()
            for part in parts:
                seq, _, rest = part.decode().partition(" ")
                if rest == "unlinked -":  # the early notice of a delete; its answer follows
                    self.unlinked.append(seq)
                    continue
                answers[seq] = rest
        return answers

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)
        self.thread.join(10)
        assert not self.thread.is_alive(), "serve() did not return at end of file"
        self.sock.close()
        self.served.close()


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """fsyncs (with the folder they synced) and answers, in the order they happened."""
    recorded: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        recorded.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(local_fs.os, "fsync", spy)
    return recorded


@pytest.fixture
def peer(local_harness: LocalHarness, events: list[tuple[str, str]]) -> Iterator[Peer]:
    p = Peer(local_harness.root, events)
    yield p
    p.close()


def request(seq: int, org: str, bid: str) -> str:
    loc = location_for(org, bid)
    return f"{seq} D {loc.organization_id} {loc.system_key} {loc.backup_id}"


def test_ok_leaves_only_after_its_folder_is_fsynced(
    peer: Peer, local_harness: LocalHarness, events: list[tuple[str, str]]
) -> None:
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    assert peer.ask(request(1, "org_c1", bid)) == {"1": "ok -"}
    folder = str(local_harness.root / "org_c1" / "KEY-C1")
    fsync_at = events.index(("fsync", folder))
    answer_at = next(i for i, (kind, data) in enumerate(events) if "1 ok" in data)
    assert fsync_at < answer_at
    assert local_harness.keys() == set()


def test_a_batch_fsyncs_each_folder_once(
    peer: Peer, local_harness: LocalHarness, events: list[tuple[str, str]]
) -> None:
    c1 = [new_backup_id() for _ in range(5)]
    r1 = [new_backup_id() for _ in range(3)]
    for bid in c1:
        local_harness.put(location_for("org_c1", bid))
    for bid in r1:
        local_harness.put(location_for("org_r1", bid))
    lines = [request(i, "org_c1", bid) for i, bid in enumerate(c1)]
    lines += [request(10 + i, "org_r1", bid) for i, bid in enumerate(r1)]
    answers = peer.ask(*lines)
    assert set(answers.values()) == {"ok -"} and len(answers) == 8
    synced = sorted(folder for kind, folder in events if kind == "fsync")
    root = local_harness.root
    assert synced == sorted([str(root / "org_c1" / "KEY-C1"), str(root / "org_r1" / "KEY-R1")])
    assert local_harness.keys() == set()


def test_mixed_answers_reach_their_own_requests(
    peer: Peer, local_harness: LocalHarness, events: list[tuple[str, str]]
) -> None:
    """A batch wider than the pool, spread over its threads in shares: every request gets
    its own answer, and only folders where something was unlinked are fsynced."""
    orgs = ["org_c1", "org_r1", "org_c1b"]
    lines, expected = [], {}
    for i in range(15):
        org, bid = orgs[i % 3], new_backup_id()
        present = i % 2 == 0 and org != "org_c1b"
        if present:
            local_harness.put(location_for(org, bid))
        lines.append(request(i, org, bid))
        expected[str(i)] = "ok -" if present else "missing -"
    assert peer.ask(*lines) == expected
    assert local_harness.keys() == set()
    synced = sorted(folder for kind, folder in events if kind == "fsync")
    root = local_harness.root
    assert synced == sorted([str(root / "org_c1" / "KEY-C1"), str(root / "org_r1" / "KEY-R1")])


def test_missing_symlinked_and_malformed_requests_touch_nothing(
    peer: Peer, local_harness: LocalHarness, tmp_path: Path, events: list[tuple[str, str]]
) -> None:
    kept = new_backup_id()
    local_harness.put(location_for("org_c1", kept))
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    linked = new_backup_id()
    os.symlink(victim, local_harness.root / "org_c1" / "KEY-C1" / linked)
    answers = peer.ask(
        request(1, "org_c1", new_backup_id()),
        request(2, "org_c1", linked),
        "3 D ../org_c1 KEY-C1 " + kept,
        "4 D org_c1 KEY-C1",
        "5 D org_c1 KEY-C1 " + kept + " extra",
        "6 X org_c1 KEY-C1 " + kept,
    )
    assert answers["1"] == "missing -"
    assert answers["2"] == "symlink -"
    for seq in "3456":
        assert answers[seq] == "failed malformed request"
    assert victim.read_bytes() == b"precious"
    assert local_harness.exists(location_for("org_c1", kept))
    assert not [e for e in events if e[0] == "fsync"]


def test_probe_follows_the_root(peer: Peer, local_harness: LocalHarness) -> None:
    assert peer.ask("1 R") == {"1": "ok -"}
    local_harness.root.rename(local_harness.root.with_name("moved"))
    assert peer.ask("2 R")["2"].startswith("failed backup root")


# ---- the gateway's side: a real process per gateway


def io_pid(client: Any) -> int:
    pid = client.app[STORE].io_process_pid
    assert pid is not None
    return int(pid)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def delete_once_respawned(client: Any, bid: str) -> Any:
    """Delete until the answer is not the 502 of a lost I/O process that may not be
    restarted yet (not more often than once a second); that answer."""

    async def answered() -> Any:
        resp = await delete(client, bid)
        return resp if resp.status != 502 else None

    return await eventually(answered, "a delete answered by a respawned I/O process")


async def test_killed_process_fails_its_deletes_and_is_replaced(
    start_gateway: Any, local_harness: LocalHarness
) -> None:
    client = await start_gateway(local_harness.storage())
    first = io_pid(client)
    held = new_backup_id()
    local_harness.put(location_for("org_c1", held))
    os.kill(first, signal.SIGSTOP)  # it reads nothing until it dies
    pending = asyncio.ensure_future(delete(client, held))
    # the delete is in the gateway (this scrape counts itself too), its request sent to
    # the stopped process in the same turn of the loop
    await eventually(
        lambda: scraped_is(client, "gateway_http_requests_in_flight", 2), "the delete in flight"
    )
    os.kill(first, signal.SIGKILL)
    resp = await pending
    assert resp.status == 502
    assert await resp.json() == {
        "code": 502,
        "message": "failed to delete backup",
        "data": {"type": "external_api_error", "errors": []},
    }
    assert local_harness.exists(location_for("org_c1", held))
    resp = await delete_once_respawned(client, held)
    assert resp.status == 200
    assert not local_harness.exists(location_for("org_c1", held))
    assert io_pid(client) != first
    await eventually(lambda: not alive(first), f"the killed process {first} reaped")


async def test_hung_process_costs_a_bounded_502_and_is_replaced(
    start_gateway: Any, local_harness: LocalHarness
) -> None:
    client = await start_gateway({**local_harness.storage(), "operation_timeout_seconds": 1.0})
    hung = io_pid(client)
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    os.kill(hung, signal.SIGSTOP)  # a disk that stopped answering
    started = time.monotonic()
    resp = await delete(client, bid)
    assert resp.status == 502
    assert time.monotonic() - started < 1 + 5  # the operation timeout, not a hang
    assert local_harness.exists(location_for("org_c1", bid))
    # abandoned and killed, not left stopped
    await eventually(lambda: not alive(hung), f"the hung process {hung} killed")
    resp = await delete_once_respawned(client, bid)
    assert resp.status == 200
    assert not local_harness.exists(location_for("org_c1", bid))


async def test_requests_failed_with_a_lost_process_never_reach_the_next_one(
    local_harness: LocalHarness,
) -> None:
    # A delete queued in the very iteration the process is lost answers 502; it must not be
    # carried over to the replacement process and done after all.
    io = LocalIoProcess(local_harness.root, fsync=True, threads=2, timeout=5.0)
    io.start()
    try:
        doomed, later = new_backup_id(), new_backup_id()
        for bid in (doomed, later):
            local_harness.put(location_for("org_c1", bid))
        loc = location_for("org_c1", doomed)
        pending = io.request(f"D org_c1 {loc.system_key} {doomed}".encode())
        io._lost("lost for the test")  # before the queued request is flushed
        with pytest.raises(StorageUnavailable):
            await pending

        async def respawned() -> tuple[bytes, bytes] | None:
            try:  # refused until a second after the last start
                pending = io.request(f"D org_c1 {loc.system_key} {later}".encode())
            except StorageUnavailable:
                return None
            return await pending

        answer = await eventually(respawned, "a request that respawns the process")
        assert answer is not None and answer[0] == b"ok"
        assert local_harness.exists(location_for("org_c1", doomed))
        assert not local_harness.exists(location_for("org_c1", later))
    finally:
        await io.close()


def children_named(pid: int, word: str) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                with open(f"/proc/{child}/cmdline", "rb") as c:
                    if word.encode() in c.read():
                        found.append(int(child))
    return found


def test_process_ignores_sigterm_and_leaves_with_the_gateway(
    tmp_path: Path, local_harness: LocalHarness
) -> None:
    port = free_port()
    config = write_config(tmp_path, port, local_harness.storage())
    proc = serve_gateway(config)
    try:
        wait_for_port(port, proc=proc)
        [helper] = children_named(proc.pid, "storage_backends.local.io_process")
        # A service manager signals the whole group; the gateway still needs its I/O process.
        os.kill(helper, signal.SIGTERM)
        bid = new_backup_id()
        local_harness.put(location_for("org_c1", bid))
        url = f"http://127.0.0.1:{port}/api/systems/sys_c1/backups/{bid}"
        status, _ = http("DELETE", url, token_for("org_c1"))
        assert status == 200
        assert not local_harness.exists(location_for("org_c1", bid))
        assert alive(helper)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        wait_until(lambda: not alive(helper), "the I/O process to leave with its gateway")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_probes_404s_and_listings_never_wait_for_a_running_fsync(
    local_harness: LocalHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow fsync of one folder (the real fsync, held back until released) must not hold
    up answers that need none: a readiness probe, a 404 and a listing elsewhere."""
    release = threading.Event()
    started = threading.Event()
    real_fsync = os.fsync

    def slow(fd: int) -> None:
        started.set()
        release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(local_fs.os, "fsync", slow)
    peer = Peer(local_harness.root, [])
    try:
        bid = new_backup_id()
        local_harness.put(location_for("org_c1", bid))
        peer.sock.sendall((request(1, "org_c1", bid) + "\n").encode())
        assert started.wait(5)
        loc = location_for("org_c2", new_backup_id())
        answers = peer.ask(
            "2 R",
            request(3, "org_c2", loc.backup_id),
            f"4 L {loc.organization_id} {loc.system_key}",
        )
        # answered while the fsync of 1 is held (until released, or 10 s): 1 not among them
        assert answers == {"2": "ok -", "3": "missing -", "4": "ok []"}
        release.set()
        while b"1 ok" not in peer.buffer:  # the socket's timeout (10 s) bounds each read
            peer.buffer += peer.sock.recv(65536)
        assert b"1 ok -\n" in peer.buffer
    finally:
        release.set()
        peer.close()


def test_a_delete_is_told_unlinked_before_its_fsync_and_ok_after(
    local_harness: LocalHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_fsync = os.fsync
    monkeypatch.setattr(local_fs.os, "fsync", lambda fd: (release.wait(10), real_fsync(fd)))
    peer = Peer(local_harness.root, [])
    try:
        bid = new_backup_id()
        local_harness.put(location_for("org_c1", bid))
        peer.sock.sendall((request(7, "org_c1", bid) + "\n").encode())
        line = b""
        while not line.endswith(b"\n"):
            line += peer.sock.recv(1)
        assert line == b"7 unlinked -\n"  # while its fsync is still held back
        assert not local_harness.exists(location_for("org_c1", bid))
        release.set()
        assert peer.ask() == {}
        while b"7 ok -\n" not in peer.buffer:
            peer.buffer += peer.sock.recv(65536)
    finally:
        release.set()
        peer.close()
