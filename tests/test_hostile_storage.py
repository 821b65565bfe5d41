"""Hostile content in storage (issue #26, points 3-6), against a real gateway process.

What a tenant (or anything else that writes under the backup root) leaves beside its
backups must cost that tenant, at most, default metadata: a sidecar nested 100,000 deep, an
`uploaded_at` that overflows in UTC or a lone-surrogate filename made the shared I/O
process exit (every tenant's deletes 502 while it restarted), and a FIFO named like a
backup id wedged the reader threads until restart.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from storage_backends.ids import new_uuid7

from .conftest import StartGateway
from .support import (
    LocalHarness,
    MotoServer,
    OutputWatcher,
    S3Harness,
    bearer,
    eventually,
    free_port,
    location_for,
    new_backup_id,
    serve_gateway,
    stop_process,
    token_for,
    wait_for_port,
    write_config,
)

# What each sidecar says, and why it used to take the I/O process down.
HOSTILE_SIDECARS: dict[str, bytes] = {
    "nested": b"[" * 100_000 + b"]" * 100_000,  # RecursionError in json.loads
    "overflow": json.dumps({"uploaded_at": "9999-12-31T23:59:59-12:00"}).encode(),  # Overflow
    "underflow": json.dumps({"uploaded_at": "0001-01-01T00:00:00+14:00"}).encode(),
    "surrogate": b'{"filename": "\\ud800.tar.gz", "mimetype": "\\udfff/x"}',  # not UTF-8
    "odd types": json.dumps(
        {"filename": ["x"], "sha256": 7, "mimetype": None, "uploaded_at": {"a": 1}}
    ).encode(),
    "control": json.dumps(
        {"filename": "a\x00\x1b[2Jb", "uploaded_at": "2026-13-01T00:00Z"}
    ).encode(),
}


class Gateway:
    def __init__(self, port: int, harness: LocalHarness, output: OutputWatcher, pid: int) -> None:
        self.pid = pid
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.harness = harness
        self.output = output


@contextlib.contextmanager
def gateway(
    tmp_path: Path,
    open_files: int | None = None,
    io: str = "process",
    hard_open_files: bool = False,
    **settings: Any,
) -> Iterator[Gateway]:
    port = free_port()
    harness = LocalHarness(tmp_path / "backups", io=io)
    storage = settings.pop("storage", {})
    config = write_config(
        tmp_path, port, {**harness.storage(), **storage}, logging={"level": "INFO"}, **settings
    )
    proc = serve_gateway(config, open_files=open_files, hard_open_files=hard_open_files)
    output = OutputWatcher(proc)
    try:
        wait_for_port(port, proc=proc)
        yield Gateway(port, harness, output, proc.pid)
    finally:
        stop_process(proc)
        output.wait_closed()


async def get_json(
    session: aiohttp.ClientSession, url: str, org: str = "org_c1"
) -> tuple[int, dict[str, Any]]:
    async with session.get(url, headers=bearer(token_for(org))) as resp:
        return resp.status, await resp.json()


def warnings_about(output: OutputWatcher, backup_id: str) -> collections.Counter[str]:
    """How many warnings each process (gateway or local-io) logged naming `backup_id`."""
    return collections.Counter(
        r.get("process", "gateway")
        for r in output.records()
        if r["level"] == "warning" and backup_id in r["msg"]
    )


async def test_hostile_sidecars_read_as_defaults_and_never_stop_the_io_process(
    tmp_path: Path,
) -> None:
    with gateway(tmp_path) as gw:
        hostile = {}
        for why, content in HOSTILE_SIDECARS.items():
            bid = new_backup_id()
            gw.harness.put(location_for("org_c1", bid), b"data of " + why.encode(), sidecar=False)
            sidecar = gw.harness.root / (location_for("org_c1", bid).relative_key + ".meta.json")
            sidecar.write_bytes(content)
            hostile[bid] = why
        far = new_backup_id()  # no sidecar, and an mtime no datetime can hold
        gw.harness.put(location_for("org_c1", far), b"far", sidecar=False)
        os.utime(gw.harness.root / location_for("org_c1", far).relative_key, (2**62, 2**62))
        # another tenant's backups, deleted while org_c1's folder is listed
        others = [new_backup_id() for _ in range(20)]
        for bid in others:
            gw.harness.put(location_for("org_c2", bid))

        async with aiohttp.ClientSession() as session:
            list_url = f"{gw.url}/api/systems/sys_c1/backups"

            async def delete(bid: str) -> int:
                async with session.delete(
                    f"{gw.url}/api/systems/sys_c2/backups/{bid}",
                    headers=bearer(token_for("org_c2")),
                ) as resp:
                    return resp.status

            results = await asyncio.gather(
                *[get_json(session, list_url) for _ in range(5)], *[delete(b) for b in others]
            )
            listings, deletes = results[:5], results[5:]
            assert deletes == [200] * len(others)
            assert not any(gw.harness.exists(location_for("org_c2", b)) for b in others)
            for status, body in listings:
                assert status == 200, body
                items = {i["id"]: i for i in body["data"]["backups"]}
                assert set(items) == {*hostile, far}
                assert body["data"]["slots_used"] == len(hostile) + 1
                for bid, why in hostile.items():
                    item = items[bid]
                    assert item["filename"] == bid, why  # the defaults of DESIGN.md §8
                    assert item["sha256"] == "", why
                    assert item["mimetype"] == "application/octet-stream", why
                    assert item["size"] == len(b"data of " + why.encode())
                    assert item["uploaded_at"].endswith("Z"), why
                # (ext4 holds an mtime up to 2446, tmpfs far beyond what a datetime can)
                assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", items[far]["uploaded_at"])

            for bid in [*hostile, far]:
                status, body = await get_json(
                    session, f"{gw.url}/api/systems/sys_c1/backups/{bid}/download"
                )
                assert status == 200, (hostile.get(bid), body)
                async with session.get(gw.url + body["data"]["download_url"]) as resp:
                    assert resp.status == 200
                    assert (
                        await resp.read()
                        == gw.harness.root.joinpath(
                            location_for("org_c1", bid).relative_key
                        ).read_bytes()
                    )
                    # a plain-ASCII name built from the defaults
                    assert resp.headers["Content-Disposition"].startswith(
                        f'attachment; filename="{bid.split(".")[0]}_'
                    )
            first = {bid: warnings_about(gw.output, bid) for bid in hostile}
            # read again: nothing more is logged about the same backups
            assert (await get_json(session, list_url))[0] == 200
            for bid in hostile:
                status, _ = await get_json(
                    session, f"{gw.url}/api/systems/sys_c1/backups/{bid}/download"
                )
                assert status == 200
        # the I/O process that listed is the one that started: it never exited
        assert "local I/O process" not in gw.output.text()
    for bid, why in hostile.items():
        # once by each process that read it: the I/O process (listing) and the gateway's
        # readers (describe), never again on the next reads
        assert first[bid] == {"local-io": 1, "gateway": 1}, (why, first[bid])
        assert warnings_about(gw.output, bid) == first[bid], why


async def test_a_fifo_named_like_a_backup_is_not_a_backup_and_wedges_nothing(
    tmp_path: Path,
) -> None:
    """Opened without O_NONBLOCK, each request for the FIFO took one of the four reader
    threads for good: after four, every tenant's download URL was a 502 until restart."""
    with gateway(tmp_path, storage={"operation_timeout_seconds": 1}) as gw:
        fifo = new_backup_id()
        folder = gw.harness.root / "org_c1" / "KEY-C1"
        folder.mkdir(parents=True)
        os.mkfifo(folder / fifo)
        real = new_backup_id()
        gw.harness.put_backup(location_for("org_c1", real), b"real bytes", "real.tar.gz")
        theirs = new_backup_id()
        gw.harness.put_backup(location_for("org_c2", theirs), b"their bytes", "t.tar.gz")
        async with aiohttp.ClientSession() as session:
            fifo_url = f"{gw.url}/api/systems/sys_c1/backups/{fifo}/download"
            answers = await asyncio.gather(*[get_json(session, fifo_url) for _ in range(8)])
            assert [s for s, _ in answers] == [404] * 8, answers
            assert answers[0][1]["message"] == "backup not found"
            status, body = await get_json(session, f"{gw.url}/api/systems/sys_c1/backups")
            assert status == 200
            assert [i["id"] for i in body["data"]["backups"]] == [real]
            assert body["data"]["slots_used"] == 1
            for org, sid, bid, data in (
                ("org_c1", "sys_c1", real, b"real bytes"),
                ("org_c2", "sys_c2", theirs, b"their bytes"),
            ):
                status, body = await get_json(
                    session, f"{gw.url}/api/systems/{sid}/backups/{bid}/download", org
                )
                assert status == 200, body
                async with session.get(gw.url + body["data"]["download_url"]) as resp:
                    assert resp.status == 200
                    assert await resp.read() == data
            async with session.delete(
                f"{gw.url}/api/systems/sys_c1/backups/{fifo}", headers=bearer(token_for("org_c1"))
            ) as resp:
                assert resp.status == 404
        assert (folder / fifo).exists()  # not a backup: never deleted as one


def fill_folder(
    harness: LocalHarness, org: str, count: int, readable_newest: int | None = None
) -> dict[str, int]:
    """`count` backups with sidecars in `org`'s folder, their ids a millisecond apart as an
    appliance's would be; {id: size}."""
    folder = harness.root / org / location_for(org, "x").system_key
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    start = 1_700_000_000_000
    sizes = {}
    try:
        for n in range(count):
            bid = new_uuid7(start + n) + ".tar.gz"
            size = n % 97 + 1
            sizes[bid] = size
            data = os.open(bid, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640, dir_fd=fd)
            os.write(data, b"x" * size)
            os.close(data)
            when = datetime.fromtimestamp((start + n) / 1000, UTC).isoformat()
            sidecar = json.dumps({"filename": f"b{n}.tar.gz", "uploaded_at": when}).encode()
            if readable_newest is not None and n < count - readable_newest:
                sidecar = b"{"  # a read would log it as read as defaults
            meta = os.open(bid + ".meta.json", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
            os.write(meta, sidecar)
            os.close(meta)
    finally:
        os.close(fd)
    return sizes


def bare_scan_seconds(folder: Path) -> float:
    """About what the scan of a listing of `folder` costs on this machine now: its names
    read and every name stat'ed (the sidecars too, so a little more), nothing else; the
    fastest of three passes."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        passes = []
        for _ in range(3):
            began = time.perf_counter()
            for name in os.listdir(fd):
                os.lstat(name, dir_fd=fd)
            passes.append(time.perf_counter() - began)
        return min(passes)
    finally:
        os.close(fd)


@pytest.mark.parametrize("io", ["process", "inline"])
async def test_a_big_folder_lists_its_newest_with_totals_and_stalls_no_one(
    tmp_path: Path, io: str
) -> None:
    """60,000 backups: every backup was described (a sidecar read each) in the I/O process's
    only thread, so the listing timed out (502), the process that answered nothing
    meanwhile was killed, and another tenant's deletes failed with it. Now the names and
    sizes are scanned and only the returned items are described, in a thread of their own.
    Inline, the scan ran on the event loop: every other request waited for it.

    The operation timeout is eight bare scans of the folder (at least 1.5 s), measured
    here, so it scales with how busy the machine is: two listings at once take two to four
    now, and more than eight when every backup is described (both modes then answer 502).
    A fixed 1.5 s failed one run in a few, even on a quiet machine. That only the returned
    items are described is checked by the log, whatever the timing: every older backup's
    sidecar is garbled, and a read of one is logged as read as defaults."""
    harness = LocalHarness(tmp_path / "backups", io=io)
    sizes = fill_folder(harness, "org_c1", 60_000, readable_newest=100)
    bare = bare_scan_seconds(harness.root / "org_c1" / location_for("org_c1", "x").system_key)
    with gateway(
        tmp_path,
        io=io,
        storage={"operation_timeout_seconds": max(1.5, 8 * bare)},
        limits={"max_list_items": 100},
    ) as gw:
        # the start-up scan of the fleet reads the same folder: the listings come after it
        assert "fleet scan done" in gw.output.wait_for_line("fleet scan ")  # or failed
        others = [new_backup_id() for _ in range(20)]
        for bid in others:
            gw.harness.put(location_for("org_c2", bid))
        finished: list[str] = []  # what answered, in order
        async with aiohttp.ClientSession() as session:
            list_url = f"{gw.url}/api/systems/sys_c1/backups"

            async def delete(bid: str) -> int:
                async with session.delete(
                    f"{gw.url}/api/systems/sys_c2/backups/{bid}",
                    headers=bearer(token_for("org_c2")),
                ) as resp:
                    finished.append("delete")
                    return resp.status

            async def listing() -> tuple[int, dict[str, Any]]:
                answer = await get_json(session, list_url)
                finished.append("list")
                return answer

            listings = asyncio.gather(*[listing() for _ in range(2)])
            deletes = await asyncio.gather(*[delete(b) for b in others])
            assert deletes == [200] * len(others)
            # the other tenant's deletes never waited for the scan of a big folder
            assert finished == ["delete"] * len(others), finished
            assert not any(gw.harness.exists(location_for("org_c2", b)) for b in others)
            for status, body in await listings:
                assert status == 200, body
                data = body["data"]
                newest = sorted(sizes, reverse=True)[:100]
                assert [i["id"] for i in data["backups"]] == newest
                assert data["backups"][0]["filename"] == "b59999.tar.gz"
                assert data["slots_used"] == 60_000
                assert data["quota_used_bytes"] == sum(sizes.values())
                assert data["truncated"] is True
        assert "local I/O process" not in gw.output.text()
        assert "read as defaults" not in gw.output.text()  # no older backup was described


async def status_of(port: int, path: str) -> tuple[str, str, asyncio.StreamWriter | None]:
    """One download that never reads its body: ("200"/"503"/..., its Retry-After, the
    writer to close later), or ("reset", "", None) when refused at accept."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")  # the head only: the body is never read
    except (ConnectionError, asyncio.IncompleteReadError):
        return "reset", "", None
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return lines[0].split(" ")[1], headers.get("Retry-After", ""), writer


async def test_downloads_that_never_read_hold_only_their_share_of_descriptors(
    tmp_path: Path,
) -> None:
    """800 downloads that never read, at 1,024 open files (hard): each held its connection's
    descriptor and its file's, the gateway ran out, and every other tenant's request failed.
    Now open backups have their own bound (32 for one organization) beyond which a download
    is a 503 with Retry-After and its connection closed, and the connection cap leaves room
    for them."""
    with gateway(tmp_path, open_files=1024, hard_open_files=True) as gw:
        big = new_backup_id()
        gw.harness.put_backup(location_for("org_c1", big), os.urandom(16 << 20), "big.tar.gz")
        theirs, doomed = new_backup_id(), new_backup_id()
        gw.harness.put_backup(location_for("org_c2", theirs), b"their bytes", "t.tar.gz")
        gw.harness.put(location_for("org_c2", doomed))
        async with aiohttp.ClientSession() as session:
            status, body = await get_json(
                session, f"{gw.url}/api/systems/sys_c1/backups/{big}/download"
            )
            assert status == 200
            link = body["data"]["download_url"]
            async with asyncio.timeout(60):
                attack = await asyncio.gather(*[status_of(gw.port, link) for _ in range(800)])
            try:
                statuses = collections.Counter(s for s, _, _ in attack)
                assert statuses["200"] == 32, statuses
                assert set(statuses) <= {"200", "503", "reset"}, statuses
                assert {r for s, r, _ in attack if s == "503"} == {"5"}
                # the gateway holds its 32 open backups and stays within its descriptors
                assert len(os.listdir(f"/proc/{gw.pid}/fd")) < 1024 - 64
                # and another tenant is served as usual
                timeout = aiohttp.ClientTimeout(total=10)
                status, body = await get_json(
                    session, f"{gw.url}/api/systems/sys_c2/backups/{theirs}/download", "org_c2"
                )
                assert status == 200, body
                async with session.get(gw.url + body["data"]["download_url"], timeout=timeout) as r:
                    assert r.status == 200
                    assert await r.read() == b"their bytes"
                status, body = await get_json(
                    session, f"{gw.url}/api/systems/sys_c2/backups", "org_c2"
                )
                assert status == 200 and body["data"]["slots_used"] == 2
                async with session.delete(
                    f"{gw.url}/api/systems/sys_c2/backups/{doomed}",
                    headers=bearer(token_for("org_c2")),
                    timeout=timeout,
                ) as r:
                    assert r.status == 200
                assert not gw.harness.exists(location_for("org_c2", doomed))
            finally:
                for _, _, writer in attack:
                    if writer is not None:
                        writer.close()

            async def released() -> bool:
                async with session.get(f"{gw.url}/metrics") as r:
                    return "\ngateway_open_backups 0.0\n" in await r.text()

            await eventually(released, "the held backups closed once their clients left")


async def test_hostile_object_metadata_on_s3_reads_as_defaults(
    start_gateway: StartGateway, moto_server: MotoServer
) -> None:
    """An object's x-amz-meta-uploaded-at of 9999-12-31T23:59:59-12:00 (past year 9999 in
    UTC) made its system's list and its download URL 500s."""
    harness = S3Harness(moto_server.endpoint, f"bkt-{uuid.uuid4().hex[:12]}")
    client = await start_gateway(harness.storage(), limits={"max_list_items": 2})
    now = int(time.time() * 1000)
    hostile = new_uuid7(now) + ".tar.gz"  # the newest: its metadata is read for the list
    harness.put_key(
        location_for("org_c1", hostile).relative_key,
        b"hostile",
        {"uploaded-at": "9999-12-31T23:59:59-12:00", "filename": "%00%1b[2J", "sha256": "zz"},
    )
    plain = [new_uuid7(now - 3 + n) + ".tar.gz" for n in range(3)]
    for bid in plain:
        harness.put_backup(location_for("org_c1", bid), b"plain", "p.tar.gz")
    resp = await client.get("/api/systems/sys_c1/backups", headers=bearer(token_for("org_c1")))
    assert resp.status == 200, await resp.text()
    data = (await resp.json())["data"]
    # totals come from the listing; only the two newest were described
    assert (data["slots_used"], data["quota_used_bytes"], data["truncated"]) == (4, 22, True)
    assert len(data["backups"]) == 2
    assert {b["id"] for b in data["backups"]} == {hostile, plain[2]}
    [shown] = [b for b in data["backups"] if b["id"] == hostile]
    assert (shown["filename"], shown["sha256"]) == (hostile, "")
    assert shown["uploaded_at"].endswith("Z")
    resp = await client.get(
        f"/api/systems/sys_c1/backups/{hostile}/download", headers=bearer(token_for("org_c1"))
    )
    assert resp.status == 200, await resp.text()
    resp = await client.get(
        f"/api/systems/sys_c1/backups/{hostile}/download", headers=bearer(token_for("org_c1"))
    )
    assert resp.status == 200
    assert harness.exists(location_for("org_c1", hostile))
