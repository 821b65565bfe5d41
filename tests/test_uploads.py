"""POST /api/systems/backups (DESIGN.md §9): appliances upload, on every backend and server.

Every refusal is checked for its status and envelope, for a closed connection (the body
is never drained), and for what it leaves in storage: nothing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient

from gateway.backups.storage import STORE

from .conftest import Harness, StartGateway
from .support import (
    APPLIANCE_SECRETS,
    DIRECTORY,
    LocalHarness,
    S3Harness,
    bearer,
    eventually,
    new_backup_id,
    scraped_is,
    token_for,
)
from .support import basic as credentials_header

URL = "/api/systems/backups"
KEY = "KEY-C1"
SECRET = APPLIANCE_SECRETS["sys_c1"]
UUID7 = r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def basic(key: str = KEY, secret: str = SECRET) -> dict[str, str]:
    """sys_c1's credentials unless told otherwise."""
    return credentials_header(key, secret)


async def upload(
    client: TestClient,
    data: bytes,
    key: str = KEY,
    secret: str = SECRET,
    filename: str | None = "backup.tar.gz",
    **headers: str,
) -> tuple[Any, dict[str, Any]]:
    sent = {**basic(key, secret), "Content-Type": "application/gzip", **headers}
    if filename is not None:
        sent["X-Filename"] = filename
    resp = await client.post(URL, data=data, headers=sent)
    return resp, await resp.json()


def stored(harness: Harness) -> set[str]:
    """Every key/file in storage except the ones tests arrange for other systems."""
    return harness.keys()


def backups_of(harness: Harness, folder: str = "org_c1/KEY-C1/") -> list[str]:
    return sorted(
        k.removeprefix(folder)
        for k in harness.keys()
        if k.startswith(folder)
        and re.fullmatch(UUID7 + r"(\.[a-z.0-9]+)?", k.removeprefix(folder))
        and not k.endswith(".meta.json")
    )


async def raw(client: TestClient, head: bytes, body: bytes = b"", shut: bool = False) -> bytes:
    """Send bytes on a fresh connection; everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(head + body)
        await writer.drain()
        if shut:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def head_for(size: int, *extra: str, key: str = KEY, secret: str = SECRET) -> bytes:
    lines = [
        f"POST {URL} HTTP/1.1",
        "Host: x",
        basic(key, secret)["Authorization"].join(("Authorization: ", "")),
        f"Content-Length: {size}",
        "X-Filename: raw.tar.gz",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def envelope_of(answer: bytes) -> tuple[int, dict[str, Any]]:
    """The last response on a connection: its status and JSON body."""
    last = answer[answer.rfind(b"HTTP/1.1 ") :]
    head, _, body = last.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# --------------------------------------------------------------------------- stored


async def test_upload_is_stored_listed_and_downloadable(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway(harness.storage())
    data = os.urandom(300_000)

    resp, body = await upload(client, data, filename="C:\\exports\\My Backup (1).TAR.GZ")

    assert resp.status == 201, body
    assert body["code"] == 201 and body["message"] == "backup stored"
    new = body["data"]
    assert re.fullmatch(UUID7 + r"\.tar\.gz", new["id"])
    assert new["filename"] == "My_Backup__1_.TAR.GZ"
    assert new["size"] == len(data)
    assert new["sha256"] == hashlib.sha256(data).hexdigest()
    assert new["mimetype"] == "application/gzip"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", new["uploaded_at"])
    assert backups_of(harness) == [new["id"]]
    # nothing else: no temporary or staging file, no sidecar beside another name
    extra = stored(harness) - {f"org_c1/KEY-C1/{new['id']}", f"org_c1/KEY-C1/{new['id']}.meta.json"}
    assert extra == set()

    listed = await client.get("/api/systems/sys_c1/backups", headers=bearer(token_for("org_c1")))
    # listed as the 201 said, with what retention says of it (its rules are off here)
    retention = {"protected": False, "kept_by": [], "integrity": "unverified", "verified_at": None}
    assert (await listed.json())["data"]["backups"] == [{**new, **retention}]
    link = await client.get(
        f"/api/systems/sys_c1/backups/{new['id']}/download", headers=bearer(token_for("org_c1"))
    )
    assert link.status == 200
    if client.app[STORE].capabilities.serves_bytes:  # a link to this gateway
        content = await client.get(
            (await link.json())["data"]["download_url"].removeprefix("http://127.0.0.1")
        )
        assert await content.read() == data
    if isinstance(harness, S3Harness):  # S3's own object metadata, as the store wrote it
        head = harness.client.head_object(
            Bucket=harness.bucket, Key=harness.prefix + f"org_c1/KEY-C1/{new['id']}"
        )
        assert head["Metadata"]["sha256"] == new["sha256"]
        assert head["Metadata"]["uploader-ip"] == "127.0.0.1"
        assert head["ContentType"] == "application/gzip"


@pytest.mark.parametrize(
    ("filename", "suffix", "name"),
    [
        ("backup.tar.xz", ".tar.xz", "backup.tar.xz"),
        ("a/b/dump.TAR.ZST", ".tar.zst", "dump.TAR.ZST"),
        ("secret.gpg", ".gpg", "secret.gpg"),
        ("raw.bin", ".bin", "raw.bin"),
        ("notes.zip", ".bin", "notes.zip"),
        ("config.tar", ".bin", "config.tar"),
        ("../../etc/passwd", ".bin", "passwd"),
        (None, ".bin", None),
    ],
)
async def test_id_extension_and_filename_follow_the_sent_name(
    local_gateway: TestClient,
    local_harness: LocalHarness,
    filename: str | None,
    suffix: str,
    name: str | None,
) -> None:
    resp, body = await upload(local_gateway, b"data", filename=filename, **{"Content-Type": "x y"})
    assert resp.status == 201
    new = body["data"]
    assert new["id"].endswith(suffix) and re.fullmatch(UUID7 + re.escape(suffix), new["id"])
    uuid = new["id"][:36]
    assert new["filename"] == (name if name is not None else f"backup-{uuid}")
    assert new["mimetype"] == "application/octet-stream"  # not a media type: the default
    assert backups_of(local_harness) == [new["id"]]


# --------------------------------------------------------------------------- refusals


def _system_secret(system_id: str) -> str:
    return APPLIANCE_SECRETS[system_id]


BAD_CREDENTIALS = {
    "none": {},
    "bearer": {"Authorization": "Bearer " + "x" * 40},
    "bad base64": {"Authorization": "Basic !!!notbase64"},
    "no colon": {"Authorization": "Basic " + base64.b64encode(KEY.encode()).decode()},
    "unknown key": basic("KEY-NOBODY", SECRET),
    "wrong secret": basic(KEY, SECRET[:-1] + ("a" if SECRET[-1] != "a" else "b")),
    "wrong public part": basic(KEY, "my_other." + SECRET.split(".", 1)[1]),
    "another system's secret": basic(KEY, APPLIANCE_SECRETS["sys_c1b"]),
    "no my_ prefix": basic(KEY, SECRET.removeprefix("my_")),
    "deleted system": basic("KEY-DELETED", APPLIANCE_SECRETS["sys_deleted"]),
    "system without a secret": basic("KEY-D1", SECRET),
    "unsafe key": basic("../KEY-C1", SECRET),
}


@pytest.mark.parametrize("case", sorted(BAD_CREDENTIALS))
async def test_bad_credentials_are_401_and_store_nothing(
    local_gateway: TestClient, local_harness: LocalHarness, case: str
) -> None:
    before = local_harness.keys()
    headers = {**BAD_CREDENTIALS[case], "Content-Type": "application/gzip"}
    resp = await local_gateway.post(URL, data=b"x" * 1000, headers=headers)
    assert resp.status == 401
    assert await resp.json() == {"code": 401, "message": "invalid system credentials", "data": {}}
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="System Authentication"'
    assert resp.headers["Connection"] == "close"
    assert local_harness.keys() == before


async def test_repeated_authorization_headers_are_401(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    auth = basic()["Authorization"].encode()
    head = head_for(4).replace(
        b"Host: x", b"Host: x\r\nAuthorization: " + auth.split(b" ", 1)[1].join((b"Basic ", b""))
    )
    status, body = envelope_of(await raw(local_gateway, head, b"data"))
    assert status == 401 and body["message"] == "invalid system credentials"
    assert backups_of(local_harness) == []


async def test_a_suspended_system_may_not_upload(
    start_gateway: StartGateway, local_harness: LocalHarness, tmp_path: Path
) -> None:
    directory = json.loads(json.dumps(DIRECTORY))
    for system in directory["systems"]:
        if system["id"] == "sys_c1":
            system["suspended"] = True
    (tmp_path / "directory.yaml").write_text(yaml.safe_dump(directory))
    client = await start_gateway(local_harness.storage())
    resp, body = await upload(client, b"data")
    assert resp.status == 401 and body["message"] == "invalid system credentials"
    assert backups_of(local_harness) == []
    # reads and deletes are not affected by suspension
    listed = await client.get("/api/systems/sys_c1/backups", headers=bearer(token_for("org_c1")))
    assert listed.status == 200


async def test_repeated_failures_from_one_address_are_throttled(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    client = await start_gateway(
        {**local_harness.storage(), "retention": {"failed_logins_per_minute": 3}}
    )
    for _ in range(3):
        resp, _ = await upload(client, b"x", secret="my_a.b")
        assert resp.status == 401
    resp, body = await upload(client, b"x", secret="my_a.b")  # failures beyond the limit
    assert resp.status == 429
    assert body["message"] == "too many failed authentication attempts"
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert backups_of(local_harness) == []
    # the brake bounds failures; it never refuses the appliance's own, correct secret
    resp, body = await upload(client, b"x")
    assert resp.status == 201, body
    assert backups_of(local_harness) == [body["data"]["id"]]
    # another appliance behind the same address is not held up by those failures
    other = await upload(client, b"x", key="KEY-C1B", secret=APPLIANCE_SECRETS["sys_c1b"])
    assert other[0].status == 201


async def test_unknown_keys_cost_what_wrong_secrets_cost(local_gateway: TestClient) -> None:
    """The work per attempt is the same: one salted hash and two constant-time compares.
    Measured as a ratio of medians over many attempts, generous for a noisy machine."""
    from gateway.identity.appliance import new_secret, secret_matches

    made = new_secret()
    wrong = made.secret[:-1] + "x"

    cases = {
        "known": lambda: secret_matches(made.public, made.sha256, wrong),
        "unknown": lambda: secret_matches(None, None, wrong),
        "malformed": lambda: secret_matches(made.public, made.sha256, "nope"),
    }
    samples: dict[str, list[int]] = {name: [] for name in cases}
    for _ in range(3000):  # interleaved: the machine's load falls on all three alike
        for name, call in cases.items():
            started = time.perf_counter_ns()
            call()
            samples[name].append(time.perf_counter_ns() - started)
    known, unknown, malformed = (sorted(samples[n])[1500] for n in cases)
    assert 0.5 < unknown / known < 2 and 0.5 < malformed / known < 2


async def test_chunked_uploads_are_411_and_read_nothing(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    head = head_for(0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
    status, body = envelope_of(await raw(local_gateway, head, b"4\r\ndata\r\n0\r\n\r\n"))
    assert status == 411 and body["message"] == "Content-Length required"
    both = head_for(4).replace(b"Host: x", b"Host: x\r\nTransfer-Encoding: chunked")
    answer = await raw(local_gateway, both, b"4\r\ndata\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 400 Bad Request")  # aiohttp's parser refuses both
    assert backups_of(local_harness) == []


async def test_a_post_without_content_length_is_411(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    head = head_for(0).replace(b"Content-Length: 0\r\n", b"")
    status, body = envelope_of(await raw(local_gateway, head))
    assert status == 411 and body["message"] == "Content-Length required"
    assert backups_of(local_harness) == []


@pytest.mark.parametrize("setting", ["max_upload_bytes", "max_bytes_per_system"])
async def test_too_large_is_413_before_the_body_and_before_100_continue(
    start_gateway: StartGateway, local_harness: LocalHarness, setting: str
) -> None:
    client = await start_gateway({**local_harness.storage(), "retention": {setting: 1000}})
    # announced, never sent: the answer must come without waiting for the body
    answer = await raw(client, head_for(10**9, "Expect: 100-continue"))
    assert b"100 Continue" not in answer
    status, body = envelope_of(answer)
    assert status == 413 and body["message"] == "backup too large"
    assert backups_of(local_harness) == []
    resp, _ = await upload(client, b"x" * 1000)  # at the cap: fine
    assert resp.status == 201


async def test_100_continue_comes_only_after_the_checks(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", local_gateway.port)
    writer.write(head_for(4, "Expect: 100-continue"))
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"data")
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 201")
    # a wrong secret gets its 401 without a 100 Continue
    answer = await raw(local_gateway, head_for(4, "Expect: 100-continue", secret="my_a.b"))
    assert b"100 Continue" not in answer and envelope_of(answer)[0] == 401
    assert len(backups_of(local_harness)) == 1


async def test_gzip_bodies_are_415(local_gateway: TestClient, local_harness: LocalHarness) -> None:
    resp, body = await upload(
        local_gateway, b"\x1f\x8b" + b"x" * 50, **{"Content-Encoding": "gzip"}
    )
    assert resp.status == 415 and body["message"] == "Content-Encoding is not accepted"
    assert backups_of(local_harness) == []


async def test_upload_rate_is_limited_per_system(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    client = await start_gateway(
        {**local_harness.storage(), "retention": {"uploads_per_minute": 2}}
    )
    for _ in range(2):
        assert (await upload(client, b"x"))[0].status == 201
    resp, body = await upload(client, b"x")
    assert resp.status == 429 and body["message"] == "too many uploads"
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert len(backups_of(local_harness)) == 2
    # another system has its own count
    other = await upload(client, b"x", key="KEY-C1B", secret=APPLIANCE_SECRETS["sys_c1b"])
    assert other[0].status == 201


async def test_organization_quota_is_413(start_gateway: StartGateway, harness: Harness) -> None:
    client = await start_gateway(
        {**harness.storage(), "retention": {"max_bytes_per_organization": 2500}}
    )
    assert (await upload(client, b"x" * 1000))[0].status == 201
    # another system of the organization counts; names that are not backups do not
    harness.put_key(f"org_c1/KEY-OTHER/{new_backup_id()}", b"x" * 1000)
    harness.put_key("org_c1/KEY-OTHER/notes.txt", b"x" * 5000)
    resp, body = await upload(client, b"x" * 501)
    assert resp.status == 413 and body["message"] == "organization backup quota exceeded"
    assert len(backups_of(harness)) == 1
    assert (await upload(client, b"x" * 500))[0].status == 201  # exactly at the quota
    # another organization's quota is its own
    resp, _ = await upload(client, b"x" * 1000, key="KEY-C2", secret=APPLIANCE_SECRETS["sys_c2"])
    assert resp.status == 201


async def test_no_storage_is_503(start_gateway: StartGateway) -> None:
    client = await start_gateway({"backend": "none"})
    resp, body = await upload(client, b"x")
    assert resp.status == 503 and body["message"] == "backup storage not configured"


# --------------------------------------------------------------------------- bodies


async def test_a_short_body_leaves_nothing(
    start_gateway: StartGateway, harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The client sends less than announced and stops sending. aiohttp closes a connection
    on the client's EOF, so no answer can reach it; what matters is that nothing stays."""
    client = await start_gateway(harness.storage())
    before = harness.keys()
    with caplog.at_level("INFO"):
        await raw(client, head_for(1000), b"x" * 400, shut=True)

        def audited() -> list[dict[str, Any]]:
            records = [r for r in caplog.records if r.getMessage() == "backup upload"]
            return [getattr(r, "fields", {}) for r in records]

        # the upload's end is audited; its discard may come after the request
        await eventually(lambda: audited() and _nothing_left(harness, before), "the discard")
    assert harness.keys() == before
    _assert_no_leftovers(harness)
    # "cancelled" where the server cancels handlers of lost connections (aiohttp's test
    # server does; the gateway's own does not, and reads the short body to its end)
    assert [a["outcome"] for a in audited()] in (["upload length mismatch"], ["cancelled"])


async def test_a_long_body_is_400_and_leaves_nothing(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway(harness.storage())
    before = harness.keys()
    # head first, then the body and 50 bytes more: the upload sees what follows it
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(head_for(100))
    await writer.drain()
    await _handled(client)
    writer.write(b"x" * 150)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status, body = envelope_of(answer)
    assert status == 400 and body["message"] == "upload length mismatch"
    # all of it in one write: aiohttp's parser refuses the request before it is handled
    answer = await raw(client, head_for(100), b"x" * 150)
    assert answer.startswith(b"HTTP/1.0 400 Bad Request")
    await eventually(lambda: _nothing_left(harness, before), "the refused upload's discard")
    assert harness.keys() == before
    _assert_no_leftovers(harness)


async def test_a_client_that_goes_away_halfway_leaves_nothing(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway(harness.storage())
    before = harness.keys()
    _reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(head_for(50_000_000) + os.urandom(3_000_000))
    await writer.drain()
    await _handled(client)
    writer.transport.abort()  # a reset, mid-body
    await eventually(lambda: _nothing_left(harness, before), "the lost upload's discard")
    assert harness.keys() == before
    _assert_no_leftovers(harness)


async def test_a_slow_body_is_cut_off(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    client = await start_gateway(
        {**local_harness.storage(), "retention": {"min_rate_bytes_per_second": 1000}},
        server={"request_timeout_seconds": 1},
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    started = time.monotonic()
    writer.write(head_for(1000) + b"x" * 10)  # 1 s + 1000 B at 1000 B/s: cut after ~2 s
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    assert 1.5 < time.monotonic() - started < 2 + 8  # the bound is a loaded machine's
    status, body = envelope_of(answer)
    assert status == 408 and body["message"] == "upload timed out"
    await eventually(lambda: not _leftovers(local_harness), "the cut upload's discard")
    assert backups_of(local_harness) == []
    _assert_no_leftovers(local_harness)


def _leftovers(harness: Harness) -> list[str]:
    return [k for k in harness.keys() if ".upload" in k]


def _nothing_left(harness: Harness, before: set[str]) -> bool:
    if isinstance(harness, S3Harness):
        uploads = harness.client.list_multipart_uploads(Bucket=harness.bucket)
        if uploads.get("Uploads"):
            return False
    return harness.keys() == before and not _leftovers(harness)


async def _handled(client: TestClient) -> None:
    """Until the gateway handles the upload whose head was sent (the request in flight
    beside this scrape's own): what is sent next reaches the upload, not the parser."""
    await eventually(
        lambda: scraped_is(client, "gateway_http_requests_in_flight", 2), "the upload handled"
    )


def _assert_no_leftovers(harness: Harness) -> None:
    assert _leftovers(harness) == []
    if isinstance(harness, S3Harness):
        uploads = harness.client.list_multipart_uploads(Bucket=harness.bucket)
        assert uploads.get("Uploads", []) == []


async def test_an_unknown_expectation_is_417(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    status, body = envelope_of(
        await raw(local_gateway, head_for(4, "Expect: something-else"), b"data")
    )
    assert status == 417 and body["message"] == "expectation failed"
    assert backups_of(local_harness) == []


async def test_a_directory_that_cannot_answer_is_503(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    from .support import free_port

    nowhere = f"postgresql://gateway@127.0.0.1:{free_port()}/platform"
    client = await start_gateway(
        local_harness.storage(),
        directory={
            "kind": "postgres",
            "postgres": {"dsn": nowhere, "owner_organization_id": "org_owner",
                         "statement_timeout_seconds": 0.5},
        },
    )  # fmt: skip
    resp, body = await upload(client, b"data")
    assert resp.status == 503 and body["message"] == "directory unavailable"
    assert resp.headers["Retry-After"] == "1"
    assert backups_of(local_harness) == []


async def test_a_broken_store_is_502_and_leaves_nothing(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-root"
    client = await start_gateway({"backend": "local", "local": {"root": str(missing)}})
    resp, body = await upload(client, b"data")
    assert resp.status == 502
    assert body == {
        "code": 502,
        "message": "failed to store backup",
        "data": {"type": "external_api_error", "errors": []},
    }
    assert not missing.exists()


async def test_a_missing_bucket_is_502(start_gateway: StartGateway, s3_server: Any) -> None:
    from .support import s3_settings

    storage = {"backend": "s3", "s3": s3_settings(s3_server.endpoint, "no-such-bucket-here")}
    client = await start_gateway(
        {**storage, "retention": {"max_bytes_per_organization": 0}}  # straight to the PUT
    )
    resp, body = await upload(client, b"data")
    assert resp.status == 502 and body["message"] == "failed to store backup"
    assert "no-such-bucket" not in json.dumps(body)
