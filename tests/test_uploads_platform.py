"""Uploads beside the platform and as a real process: credentials from PostgreSQL, rates and
locks in Redis, a full disk, a crash mid-upload, memory while 2 GiB stream in, S3 parts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import StartGateway
from .servers import RedisServer
from .support import (
    APPLIANCE_SECRETS,
    LocalHarness,
    OutputWatcher,
    S3Harness,
    eventually,
    free_port,
    mounted_tmpfs,
    serve_gateway,
    stop_process,
    wait_for_port,
    wait_until,
    write_config,
)
from .test_uploads import KEY, backups_of, head_for, upload


async def test_the_database_directory_provides_the_credentials(
    start_gateway: StartGateway, local_harness: LocalHarness, directory_section: dict[str, Any]
) -> None:
    client = await start_gateway(local_harness.storage(), directory=directory_section)
    resp, body = await upload(client, b"from the appliance")
    assert resp.status == 201, body
    assert backups_of(local_harness) == [body["data"]["id"]]
    wrong, _ = await upload(client, b"x", secret=APPLIANCE_SECRETS["sys_c1b"])
    assert wrong.status == 401
    gone, _ = await upload(client, b"x", key="KEY-DELETED", secret=APPLIANCE_SECRETS["sys_deleted"])
    assert gone.status == 401
    assert len(backups_of(local_harness)) == 1


async def test_a_soft_deleted_organizations_appliances_may_not_upload(
    start_gateway: StartGateway, local_harness: LocalHarness, directory_section: dict[str, Any]
) -> None:
    """The system is live and its secret right, but its organization is soft-deleted."""
    client = await start_gateway(local_harness.storage(), directory=directory_section)
    resp, body = await upload(
        client, b"x", key="KEY-C-GONE", secret=APPLIANCE_SECRETS["sys_c_gone"]
    )
    assert resp.status == 401 and body["message"] == "invalid system credentials"
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="System Authentication"'
    assert [k for k in local_harness.keys() if "KEY-C-GONE" in k] == []


async def test_rates_are_shared_through_the_platforms_redis_keys(
    start_gateway: StartGateway, local_harness: LocalHarness, redis: RedisServer
) -> None:
    storage = {**local_harness.storage(), "retention": {"uploads_per_minute": 3}}
    first = await start_gateway(storage, redis={"url": redis.url})
    second = await start_gateway(storage, redis={"url": redis.url})  # another process
    rates = redis.client(1)
    statuses = []
    for client in (first, second, first, second):
        statuses.append((await upload(client, b"x"))[0].status)
    assert statuses == [201, 201, 201, 429]
    minute = int(time.time() // 60)
    assert int(rates.get(f"backup:rate:min:{KEY}:{minute}") or 0) >= 4
    assert rates.ttl(f"backup:rate:min:{KEY}:{minute}") > 0
    assert int(rates.get(f"backup:rate:hour:{KEY}:{minute // 60}") or 0) >= 4
    assert len(backups_of(local_harness)) == 3


# --------------------------------------------------------------------------- full disk


@pytest.mark.parametrize("io", ["process", "inline"])
async def test_a_full_disk_is_507_and_leaves_nothing(
    start_gateway: StartGateway, tmp_path: Path, io: str
) -> None:
    with mounted_tmpfs(tmp_path / "small", "size=1m") as root:
        harness = LocalHarness(root, io=io)
        client = await start_gateway(harness.storage())
        resp, body = await upload(client, b"x" * 300_000)  # fits
        assert resp.status == 201
        kept = body["data"]["id"]
        resp, body = await upload(client, os.urandom(2_000_000))  # does not
        assert resp.status == 507
        assert body == {"code": 507, "message": "insufficient storage", "data": {}}
        assert resp.headers["Connection"] == "close"
        await eventually(lambda: not _leftovers(harness), "the refused upload's files removed")
        assert backups_of(harness) == [kept]
        assert [k for k in harness.keys() if ".upload" in k] == []
        assert (await upload(client, b"x" * 1000))[0].status == 201  # room again


# --------------------------------------------------------------------------- real process


def _gateway(tmp_path: Path, storage: dict[str, Any], **extra: Any) -> tuple[Any, int]:
    port = free_port()
    config = write_config(tmp_path, port, storage, **extra)
    proc = serve_gateway(config)
    wait_for_port(port, proc=proc)
    return proc, port


def _leftovers(harness: LocalHarness | S3Harness) -> list[str]:
    return [k for k in harness.keys() if ".upload" in k]


SWEPT = "files left by interrupted uploads"  # the start-up sweep's line, when it removed any


def _send_head(port: int, size: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head_for(size))
    return sock


def test_a_crash_mid_upload_leaves_nothing_visible_and_start_up_sweeps(tmp_path: Path) -> None:
    harness = LocalHarness(tmp_path / "backups")
    proc, port = _gateway(tmp_path, harness.storage())
    sock = _send_head(port, 100_000_000)
    sock.sendall(os.urandom(8_000_000))
    wait_until(lambda: [k for k in harness.keys() if "/.upload-" in k], "the upload being written")
    proc.kill()  # SIGKILL: no cleanup runs
    proc.wait()
    sock.close()
    assert backups_of(harness) == []  # nothing visible
    proc, port = _gateway(tmp_path, harness.storage())
    output = OutputWatcher(proc)
    try:
        output.wait_for(lambda rs: any(SWEPT in r["msg"] for r in rs))
        assert _leftovers(harness) == []
        assert backups_of(harness) == []
    finally:
        stop_process(proc)


def test_a_live_upload_of_another_process_is_never_swept(tmp_path: Path) -> None:
    harness = LocalHarness(tmp_path / "backups")
    first, port = _gateway(tmp_path, harness.storage())
    second = None
    sock = _send_head(port, 20_000_000)
    try:
        sock.sendall(os.urandom(5_000_000))
        [live] = wait_until(
            lambda: [k for k in harness.keys() if k.endswith(".partial")], "the upload's file"
        )
        # a dead upload's file beside it: the sweep's removal of it says the sweep has run
        harness.put_key(live.replace("/.upload-", "/.upload-dead-"), b"left by a crash")
        # a second gateway on the same root starts (and sweeps) while the upload runs
        (tmp_path / "second").mkdir()
        second, _ = _gateway(tmp_path / "second", harness.storage())
        OutputWatcher(second).wait_for(lambda rs: any(SWEPT in r["msg"] for r in rs))
        assert live in harness.keys()
        sock.sendall(os.urandom(15_000_000))
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
        assert len(backups_of(harness)) == 1
    finally:
        sock.close()
        stop_process(first)
        if second is not None:
            stop_process(second)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_memory_stays_flat_while_two_gib_stream_in(tmp_path: Path) -> None:
    harness = LocalHarness(tmp_path / "backups")
    size = 2 * 1024**3
    storage = {
        **harness.storage(),
        "retention": {"max_upload_bytes": size, "max_bytes_per_system": size},
    }
    proc, port = _gateway(tmp_path, storage)
    try:
        sock = _send_head(port, size)
        chunk = os.urandom(4 * 1024 * 1024)
        baseline = None
        peak = 0
        for n in range(size // len(chunk)):
            sock.sendall(chunk)
            if n == 16:  # 64 MiB in: buffers and pools are warm
                baseline = _rss_kib(proc.pid)
            if n > 16 and n % 16 == 0:
                peak = max(peak, _rss_kib(proc.pid))
        answer = sock.recv(65536)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 201"), answer[:300]
        assert baseline is not None
        growth_mib = (peak - baseline) / 1024
        print(f"RSS at 64 MiB {baseline / 1024:.1f} MiB, peak growth {growth_mib:+.1f} MiB")
        assert abs(growth_mib) < 20
        assert len(backups_of(harness)) == 1
    finally:
        stop_process(proc)
        with contextlib.suppress(FileNotFoundError):
            for path in (tmp_path / "backups").rglob("*"):
                if path.is_file():
                    path.unlink()


# --------------------------------------------------------------------------- S3 parts


async def test_large_uploads_go_up_in_parts(start_gateway: StartGateway, s3_server: Any) -> None:
    harness = S3Harness(s3_server.endpoint, f"bkt-parts-{os.getpid()}-{time.monotonic_ns()}")
    storage = harness.storage(
        multipart_threshold_bytes=6 * 1024**2, multipart_part_bytes=5 * 1024**2
    )
    client = await start_gateway(storage)
    data = os.urandom(12 * 1024**2 + 7)  # three parts: 5 + 5 + 2 MiB and 7 bytes
    resp, body = await upload(client, data)
    assert resp.status == 201, body
    key = harness.prefix + f"org_c1/KEY-C1/{body['data']['id']}"
    got = harness.client.get_object(Bucket=harness.bucket, Key=key)
    assert got["Body"].read() == data
    assert got["Metadata"]["sha256"] == body["data"]["sha256"]
    assert [k for k in harness.keys() if ".upload" in k] == []
    assert harness.client.list_multipart_uploads(Bucket=harness.bucket).get("Uploads", []) == []


async def test_a_part_cut_short_leaves_no_parts_behind(
    start_gateway: StartGateway, s3_server: Any
) -> None:
    harness = S3Harness(s3_server.endpoint, f"bkt-cut-{os.getpid()}-{time.monotonic_ns()}")
    storage = harness.storage(
        multipart_threshold_bytes=6 * 1024**2, multipart_part_bytes=5 * 1024**2
    )
    client = await start_gateway(storage)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(head_for(12 * 1024**2) + os.urandom(7 * 1024**2))
    await writer.drain()

    def multipart_uploads() -> list[Any]:
        listed = harness.client.list_multipart_uploads(Bucket=harness.bucket)
        return list(listed.get("Uploads", []))

    await eventually(multipart_uploads, "the upload going up in parts")
    writer.transport.abort()
    await eventually(
        lambda: not multipart_uploads() and not harness.keys(), "the cut upload's parts aborted"
    )
    assert multipart_uploads() == []
    assert harness.keys() == set()
    del reader


# --------------------------------------------------------------------------- CLI


def test_set_secret_then_upload_with_curl_style_credentials(tmp_path: Path) -> None:
    harness = LocalHarness(tmp_path / "backups")
    port = free_port()
    config = write_config(tmp_path, port, harness.storage())
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "set-secret",
            "--config",
            str(config),
            "--system",
            "sys_c1b",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    secret = next(line.split()[-1] for line in made.stdout.splitlines() if "system_secret:" in line)
    assert secret.startswith("my_")
    text = (tmp_path / "directory.yaml").read_text()
    assert secret not in text and secret.split(".", 1)[1] not in text  # only the hash
    entry = next(s for s in yaml.safe_load(text)["systems"] if s["id"] == "sys_c1b")
    assert entry["system_secret_public"] == secret[3:].split(".")[0]
    proc = serve_gateway(config)
    try:
        wait_for_port(port, proc=proc)
        sock = socket.create_connection(("127.0.0.1", port))
        token = base64.b64encode(f"KEY-C1B:{secret}".encode()).decode()
        sock.sendall(
            b"POST /api/systems/backups HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "
            + token.encode()
            + b"\r\nContent-Length: 5\r\nX-Filename: a.tar.gz\r\n\r\nhello"
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 201")
        sock.close()
        assert len(backups_of(harness, "org_c1b/KEY-C1B/")) == 1
    finally:
        stop_process(proc)
    unknown = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "set-secret",
            "--config",
            str(config),
            "--system",
            "nope",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert unknown.returncode == 2 and "nope" in unknown.stderr
