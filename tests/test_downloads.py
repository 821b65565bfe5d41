"""Downloads (DESIGN.md §8): issuing URLs on every backend, presigned S3 URLs fetched from the
real servers, and the gateway's own signed links on local disk — against hostile callers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import socket
import struct
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient

from gateway.backups.links import LinkSigner
from gateway.backups.names import download_name

from .conftest import Harness, StartGateway
from .support import (
    DIRECTORY,
    LocalHarness,
    bearer,
    eventually,
    location_for,
    new_backup_id,
    scrape,
    scraped_is,
    token_for,
)

WHEN = datetime(2026, 6, 5, 9, 0, 23, tzinfo=UTC)
UUID = "01934fab-bc33-7890-a1b2-c3d4e5f6a7b8"


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("filename", "backup_id", "expected"),
    [
        ("backup-2026-06-05.tar", f"{UUID}.tar.gz", "backup-2026-06-05_09-00-23.tar"),
        ("dump.json.gz.gpg", f"{UUID}.gpg", "dump_2026-06-05_09-00-23.json.gz.gpg"),
        ("my file (1).tar.gz", f"{UUID}.tar.gz", "my_file__1__2026-06-05_09-00-23.tar.gz"),
        ("", f"{UUID}.tar.gz", f"{UUID}_2026-06-05_09-00-23.tar.gz"),
        ("backup", f"{UUID}.tar.xz", "backup_2026-06-05_09-00-23.tar.xz"),
        (".hidden", f"{UUID}.bin", ".hidden_2026-06-05_09-00-23.bin"),  # no dot past the first
    ],
)
def test_friendly_names_follow_the_design(filename: str, backup_id: str, expected: str) -> None:
    assert download_name(filename, backup_id, WHEN) == expected


@pytest.mark.parametrize(
    "filename",
    ['a"b.tar', "a\\b.tar", "a\r\nSet-Cookie: x.tar", "a\x00b.tar", "résumé.tar", "日本.tar"],
)
def test_hostile_filenames_never_break_the_header(filename: str) -> None:
    name = download_name(filename, f"{UUID}.tar.gz", WHEN)
    assert name.isascii() and all(c.isalnum() or c in "._-" for c in name), name


# --------------------------------------------------------------------------- issuing


async def issue(client: TestClient, bid: str, sid: str = "sys_c1", org: str = "org_c1") -> Any:
    resp = await client.get(
        f"/api/systems/{sid}/backups/{bid}/download", headers=bearer(token_for(org))
    )
    return resp, await resp.json()


async def test_a_download_url_is_issued_on_every_backend(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway(harness.storage())
    bid = new_backup_id()
    harness.put_backup(location_for("org_c1", bid), b"payload", "backup.tar.gz")
    before = harness.keys()
    resp, body = await issue(client, bid.upper())  # ids match case-insensitively
    assert resp.status == 200, body
    assert body["message"] == "download URL issued"
    assert body["data"]["expires_in_seconds"] == 300
    assert body["data"]["download_url"]
    assert harness.keys() == before


@pytest.mark.parametrize(
    ("bid", "sid", "org", "status", "message"),
    [
        ("not-a-backup-id.tar.gz", "sys_c1", "org_c1", 400, "validation failed"),
        (None, "sys_nope", "org_c1", 404, "system not found"),
        (None, "sys_c2", "org_c1", 403, "access denied to system"),
        (None, "sys_unregistered", "org_c1", 404, "backup not found"),
        (None, "sys_c1", "org_c1", 404, "backup not found"),
    ],
)
async def test_issuing_refusals(
    local_gateway: TestClient, bid: str | None, sid: str, org: str, status: int, message: str
) -> None:
    resp = await local_gateway.get(
        f"/api/systems/{sid}/backups/{bid or new_backup_id()}/download",
        headers=bearer(token_for(org)),
    )
    body = await resp.json()
    assert (resp.status, body["message"]) == (status, message)


async def test_issuing_needs_read_systems(local_gateway: TestClient) -> None:
    from jose import jwt

    from .support import SECRET, claims_for

    claims = claims_for("org_c1", permissions=["manage:systems"])
    claims["user"]["user_permissions"] = []
    resp = await local_gateway.get(
        f"/api/systems/sys_c1/backups/{new_backup_id()}/download",
        headers=bearer(jwt.encode(claims, SECRET, algorithm="HS256")),
    )
    assert resp.status == 403


async def test_none_backend_is_503(start_gateway: StartGateway) -> None:
    client = await start_gateway({"backend": "none"})
    resp, body = await issue(client, new_backup_id())
    assert (resp.status, body["message"]) == (503, "backup storage not configured")


async def test_s3_presigned_url_serves_the_bytes_under_the_friendly_name(
    start_gateway: StartGateway, s3_harness: Any
) -> None:
    client = await start_gateway(s3_harness.storage())
    bid = new_backup_id(".tar.gz")
    data = os.urandom(4096)
    s3_harness.put_backup(location_for("org_c1", bid), data, "my file (1).tar.gz")
    resp, body = await issue(client, bid)
    assert resp.status == 200, body
    url = body["data"]["download_url"]
    assert "Signature" in url and s3_harness.endpoint in url

    def fetch() -> tuple[bytes, str]:
        with urllib.request.urlopen(url, timeout=10) as r:  # a plain client, no credentials
            return r.read(), r.headers["Content-Disposition"]

    got, disposition = await asyncio.to_thread(fetch)
    assert got == data
    assert disposition.startswith('attachment; filename="my_file__1__')
    assert disposition.endswith('.tar.gz"')


async def test_s3_presigns_against_presign_endpoint_url(
    start_gateway: StartGateway, s3_harness: Any
) -> None:
    storage = s3_harness.storage(presign_endpoint_url="https://downloads.example.com")
    client = await start_gateway(storage)
    bid = new_backup_id()
    s3_harness.put_backup(location_for("org_c1", bid), b"x", "x.tar.gz")
    _, body = await issue(client, bid)
    assert body["data"]["download_url"].startswith("https://downloads.example.com/")


def test_ttl_above_900_is_a_config_error(tmp_path: Path) -> None:
    from gateway.config import ConfigError

    from .support import make_config

    with pytest.raises(ConfigError, match="storage.download.ttl_seconds"):
        make_config(tmp_path, {"backend": "local", "download": {"ttl_seconds": 901}})


# --------------------------------------------------------------------------- local links


async def local_link(
    client: TestClient, harness: LocalHarness, data: bytes = b"0123456789" * 100, **meta: Any
) -> tuple[str, str]:
    bid = new_backup_id(".tar.gz")
    harness.put_backup(location_for("org_c1", bid), data, meta.get("filename", "backup.tar.gz"),
                       uploaded_at="2026-06-05T09:00:23Z")  # fmt: skip
    resp, body = await issue(client, bid)
    assert resp.status == 200, body
    return bid, body["data"]["download_url"]


async def test_a_local_link_serves_the_bytes_with_safe_headers_and_no_token(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    data = os.urandom(100_000)
    bid, url = await local_link(local_gateway, local_harness, data)
    assert url.startswith("/api/backups/content/")  # no public_url: a path, never Host
    resp = await local_gateway.get(url)
    assert resp.status == 200
    assert await resp.read() == data
    h = resp.headers
    assert h["Content-Type"] == "application/octet-stream"
    assert h["Content-Disposition"] == 'attachment; filename="backup_2026-06-05_09-00-23.tar.gz"'
    assert h["X-Content-Type-Options"] == "nosniff"
    assert h["Cache-Control"] == "no-store"
    assert h["Accept-Ranges"] == "bytes"
    assert h["Content-Length"] == str(len(data))
    assert h["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert h["X-Request-ID"]
    assert local_harness.exists(location_for("org_c1", bid))  # downloading deletes nothing


async def test_public_url_makes_links_absolute(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    client = await start_gateway(
        local_harness.storage(), server={"public_url": "https://backups.example.com"}
    )
    _, url = await local_link(client, local_harness)
    assert url.startswith("https://backups.example.com/api/backups/content/")
    resp = await client.get(url.removeprefix("https://backups.example.com"))
    assert resp.status == 200


async def test_head_and_ranges(local_gateway: TestClient, local_harness: LocalHarness) -> None:
    data = bytes(range(256)) * 40
    _, url = await local_link(local_gateway, local_harness, data)
    head = await local_gateway.head(url)
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(data))
    assert await head.read() == b""
    for header, status, body, content_range in [
        ("bytes=0-99", 206, data[:100], f"bytes 0-99/{len(data)}"),
        ("bytes=10000-", 206, data[10000:], f"bytes 10000-{len(data) - 1}/{len(data)}"),
        ("bytes=-16", 206, data[-16:], f"bytes {len(data) - 16}-{len(data) - 1}/{len(data)}"),
        ("bytes=10-5", 200, data, None),  # invalid: ignored
        ("bytes=0-1,5-6", 200, data, None),  # several ranges: the whole body
    ]:
        resp = await local_gateway.get(url, headers={"Range": header})
        assert resp.status == status, header
        assert await resp.read() == body, header
        assert resp.headers.get("Content-Range") == content_range, header
    resp = await local_gateway.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{len(data)}"


def tampered(link: str, how: str) -> str:
    payload, _, signature = link.partition(".")
    if how == "flipped bit":
        raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
        raw[0] ^= 1
        return payload + "." + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    if how == "truncated signature":
        return payload + "." + signature[:-4]
    if how == "empty signature":
        return payload + "."
    if how == "no signature":
        return payload
    if how == "payload for another backup":
        decoded = base64.urlsafe_b64decode(payload + "==").decode()
        other = decoded.replace(decoded.split("~")[5], new_backup_id(".tar.gz"))
        return base64.urlsafe_b64encode(other.encode()).rstrip(b"=").decode() + "." + signature
    if how == "payload for another system":
        decoded = base64.urlsafe_b64decode(payload + "==").decode()
        other = decoded.replace("~org_c1~KEY-C1~", "~org_c2~KEY-C2~")
        return base64.urlsafe_b64encode(other.encode()).rstrip(b"=").decode() + "." + signature
    if how == "garbage":
        return "%%%"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "flipped bit",
        "truncated signature",
        "empty signature",
        "no signature",
        "payload for another backup",
        "payload for another system",
        "garbage",
    ],
)
async def test_tampered_links_are_403(
    local_gateway: TestClient, local_harness: LocalHarness, how: str
) -> None:
    _, url = await local_link(local_gateway, local_harness)
    prefix, _, link = url.rpartition("/")
    resp = await local_gateway.get(f"{prefix}/{tampered(link, how)}")
    body = await resp.json()
    assert (resp.status, body) == (
        403,
        {"code": 403, "message": "invalid or expired download link", "data": {}},
    )


def signer_for(tmp_path: Path, max_ttl: int, clock: Any = time.time) -> LinkSigner:
    """A signer with the gateway's own key file (as a second gateway process would have)."""
    return LinkSigner(tmp_path / "data" / "link.secret", max_ttl, clock)


async def test_expired_links_and_links_beyond_the_ttl_are_403(
    local_gateway: TestClient, local_harness: LocalHarness, tmp_path: Path
) -> None:
    bid, good = await local_link(local_gateway, local_harness)
    location = location_for("org_c1", bid)
    expired, _ = signer_for(tmp_path, 300, clock=lambda: time.time() - 301).issue(
        "sys_c1", location, 300
    )
    too_long, _ = signer_for(tmp_path, 86_400).issue("sys_c1", location, 3600)
    for link in (expired, too_long):
        resp = await local_gateway.get(f"/api/backups/content/{link}")
        assert resp.status == 403
    assert (await local_gateway.get(good)).status == 200  # the same key, a current link


async def test_links_die_with_a_deleted_or_reassigned_system(
    start_gateway: StartGateway, local_harness: LocalHarness, directory_file: Path
) -> None:
    client = await start_gateway(local_harness.storage(), directory={"reload_seconds": 0.1})
    _, url = await local_link(client, local_harness)
    assert (await client.get(url)).status == 200
    for change in ("reassigned", "deleted"):
        systems = [dict(s) for s in DIRECTORY["systems"]]
        for s in systems:
            if s["id"] == "sys_c1":
                if change == "reassigned":
                    s["organization_id"] = "org_c1b"
                else:
                    s["deleted"] = True
        directory_file.write_text(
            yaml.safe_dump({"organizations": DIRECTORY["organizations"], "systems": systems})
        )
        # served until the reload (every 0.1 s) takes the change in, refused from then on
        resp = await eventually(lambda: _refused(client, url), f"the link refused: {change}")
        assert resp.status == 403, change


async def _refused(client: TestClient, url: str) -> Any:
    resp = await client.get(url)
    await resp.read()
    assert resp.status in (200, 403), resp.status
    return resp if resp.status == 403 else None


async def test_a_backup_swapped_for_a_symlink_after_issue_is_404(
    local_gateway: TestClient, local_harness: LocalHarness, tmp_path: Path
) -> None:
    bid, url = await local_link(local_gateway, local_harness)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not yours")
    path = local_harness.root / location_for("org_c1", bid).relative_key
    path.unlink()
    os.symlink(secret, path)
    resp = await local_gateway.get(url)
    assert resp.status == 404
    assert b"not yours" not in await resp.read()


async def test_a_planted_compressed_sibling_is_never_served(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    data = b"the real backup"
    bid, url = await local_link(local_gateway, local_harness, data)
    folder = local_harness.root / "org_c1" / "KEY-C1"
    (folder / (bid + ".gz")).write_bytes(b"planted gzip")
    (folder / (bid + ".br")).write_bytes(b"planted brotli")
    resp = await local_gateway.get(url, headers={"Accept-Encoding": "gzip, br"})
    assert resp.status == 200
    assert await resp.read() == data
    assert "Content-Encoding" not in resp.headers


async def test_a_deleted_backup_link_is_404(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    bid, url = await local_link(local_gateway, local_harness)
    (local_harness.root / location_for("org_c1", bid).relative_key).unlink()
    resp = await local_gateway.get(url)
    assert (resp.status, (await resp.json())["message"]) == (404, "backup not found")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_downloads_cut_off_mid_transfer_leave_no_descriptor_behind(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    _, url = await local_link(local_gateway, local_harness, os.urandom(4 << 20))
    full = str(local_gateway.make_url(url))
    before = open_fds()

    async def cut_off() -> None:
        reader, writer = await asyncio.open_connection(local_gateway.host, local_gateway.port)
        path = url
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        await reader.read(65536)  # a little of it
        writer.transport.abort()

    for _ in range(10):
        await asyncio.gather(*(cut_off() for _ in range(100)))  # 1,000 in all
    # the test's own sockets are gone; the server's go once it sees the resets
    await eventually(lambda: open_fds() <= before + 2, "the server's descriptors closed")
    async with aiohttp.ClientSession() as session, session.get(full) as resp:
        assert resp.status == 200  # and the gateway still serves


async def test_a_slow_reader_is_cut_off_by_the_deadline(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    client = await start_gateway(
        local_harness.storage() | {"download": {"min_rate_bytes_per_second": 8 << 20}},
        server={"request_timeout_seconds": 1},
    )
    _, url = await local_link(client, local_harness, os.urandom(16 << 20))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # before connect: a small window
    sock.connect((client.host, client.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=16384)
    writer.write(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    started = time.monotonic()
    received = 0
    try:
        while True:  # 16 KiB a second: far below 8 MiB/s
            chunk = await asyncio.wait_for(reader.read(16384), 10)
            if not chunk:
                break
            received += len(chunk)
            await asyncio.sleep(1)
            if time.monotonic() - started > 20:
                break
    except (ConnectionResetError, TimeoutError):
        pass
    writer.close()
    assert time.monotonic() - started < 15
    assert received < 16 << 20


async def test_issuing_and_serving_are_audited_and_no_signature_is_logged(
    local_gateway: TestClient, local_harness: LocalHarness, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        bid, url = await local_link(local_gateway, local_harness)
        assert (await local_gateway.get(url)).status == 200
        await local_gateway.get(url[:-3] + "AAA")  # a refused one too
    link = url.rpartition("/")[2]
    signature = link.partition(".")[2]
    lines = [
        r.getMessage() + json.dumps(getattr(r, "fields", {}), default=str) for r in caplog.records
    ]
    assert not any(signature in line or link in line for line in lines)
    audits = [r for r in caplog.records if r.name == "gateway.audit"]
    issued = [r for r in audits if r.getMessage() == "backup download issued"]
    served = [r for r in audits if r.getMessage() == "backup download served"]
    assert issued and issued[0].fields["backup_id"] == bid  # type: ignore[attr-defined]
    assert issued[0].fields["user_id"] == "u_test"  # type: ignore[attr-defined]
    assert issued[0].fields["expires_at"] > time.time()  # type: ignore[attr-defined]
    assert served and served[0].fields["peer"] == "127.0.0.1"  # type: ignore[attr-defined]
    assert served[0].fields["link_expires_at"] == issued[0].fields["expires_at"]  # type: ignore[attr-defined]
    access = [r for r in caplog.records if r.name == "gateway.access"]
    assert any(
        getattr(r, "fields", {}).get("route") == "/api/backups/content/{link}" for r in access
    )


def test_the_link_key_file_is_created_0600(tmp_path: Path) -> None:
    signer_for(tmp_path, 300)
    mode = (tmp_path / "data" / "link.secret").stat().st_mode & 0o777
    assert mode == 0o600


async def test_an_empty_suffix_range_is_416_and_a_stale_if_range_the_whole_body(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    """#26, 11: `bytes=-0` answered 206 with everything; a non-matching If-Range, 206."""
    data = os.urandom(4096)
    _, url = await local_link(local_gateway, local_harness, data)
    resp = await local_gateway.get(url, headers={"Range": "bytes=-0"})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
    etag = f'"{hashlib.sha256(data).hexdigest()}"'
    for validator, status, body in [
        ('"an-older-version"', 200, data),
        ("W/" + etag, 200, data),  # a weak validator never matches (RFC 9110 §13.1.5)
        ("Fri, 04 Dec 2026 10:00:00 GMT", 200, data),  # no Last-Modified to match
        (etag, 206, data[100:]),
    ]:
        resp = await local_gateway.get(url, headers={"Range": "bytes=100-", "If-Range": validator})
        assert resp.status == status, validator
        assert await resp.read() == body, validator


async def test_an_abandoned_download_is_a_client_abort_not_a_server_error(
    local_gateway: TestClient, local_harness: LocalHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """#26, 10: an abandoned download logged an `unhandled error` traceback and counted as
    a 500. It is the client's abort: 499, one debug line."""
    _, url = await local_link(local_gateway, local_harness, os.urandom(16 << 20))
    route = "/api/backups/content/{link}"
    aborted = f'gateway_http_requests_total{{method="GET",route="{route}",status="499"}}'
    with caplog.at_level(logging.DEBUG):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # the send stalls soon
        sock.connect((local_gateway.host, local_gateway.port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock, limit=16384)
        writer.write(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        assert (await reader.read(16384)).startswith(b"HTTP/1.1 200")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset, mid-body
        await eventually(lambda: scraped_is(local_gateway, aborted, 1), "counted as 499")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if "unhandled error" in r.getMessage()]
    cut = [r for r in caplog.records if r.getMessage().startswith("answer cut off (499)")]
    assert len(cut) == 1 and cut[0].levelno == logging.DEBUG
    served = [r for r in caplog.records if r.getMessage() == "backup download served"]
    assert served[-1].fields["outcome"] == "client gone"  # type: ignore[attr-defined]
    assert await scrape(local_gateway, aborted.replace("499", "500")) == 0
