"""GET /api/systems/{id}/backups (DESIGN.md §8), on every backend and real server."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from storage_backends.ids import new_uuid7

from .conftest import Harness, StartGateway
from .support import (
    LocalHarness,
    S3Harness,
    bearer,
    location_for,
    new_backup_id,
    s3_settings,
    token_for,
)

URL = "/api/systems/{}/backups"


async def listing(client: TestClient, sid: str = "sys_c1", org: str = "org_c1", **kw: Any) -> Any:
    resp = await client.get(URL.format(sid), headers=bearer(token_for(org, **kw)))
    return resp, await resp.json()


async def test_lists_real_backups_newest_first_with_their_metadata(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway(harness.storage())
    ids = [new_backup_id(s) for s in (".tar.gz", ".gpg", "")]
    for n, bid in enumerate(ids):
        harness.put_backup(
            location_for("org_c1", bid),
            b"x" * (10 + n),
            f"backup-{n}.tar.gz",
            uploaded_at=f"2026-11-2{n}T09:00:0{n}Z",
        )
    # Never items: sidecars (local), other names, keys deeper down, another system's.
    first = location_for("org_c1", ids[0])
    harness.put_key(first.relative_key + ".bak")
    harness.put_key("org_c1/KEY-C1/.upload-" + new_backup_id())
    harness.put_key("org_c1/KEY-C1/notes.txt")
    harness.put_key(f"org_c1/KEY-C1/sub/{new_backup_id()}")
    harness.put_key(f"org_c1/KEY-C1/{new_backup_id().upper()}")
    harness.put(location_for("org_c1b", new_backup_id()))
    before = harness.keys()

    resp, body = await listing(client)

    assert resp.status == 200
    assert body["code"] == 200 and body["message"] == "backups retrieved successfully"
    data = body["data"]
    listed = data["backups"]
    assert sorted(b["id"] for b in listed) == sorted(ids)
    order = [(b["uploaded_at"], b["id"]) for b in listed]
    assert order == sorted(order, reverse=True)  # newest first, then id descending
    assert data["quota_used_bytes"] == 10 + 11 + 12
    assert data["slots_used"] == 3
    assert data["truncated"] is False
    assert harness.keys() == before  # a listing changes nothing
    newest = next(b for b in listed if b["id"] == ids[2])
    assert newest["filename"] == "backup-2.tar.gz"
    assert newest["size"] == 12
    assert newest["sha256"] == hashlib.sha256(b"x" * 12).hexdigest()
    assert newest["mimetype"] == "application/gzip"
    if harness.name == "local":  # S3 keeps its own LastModified
        assert [b["id"] for b in listed] == list(reversed(ids))
        assert newest["uploaded_at"] == "2026-11-22T09:00:02Z"


async def test_missing_metadata_reads_as_defaults(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway(harness.storage())
    bid = new_backup_id()
    harness.put(location_for("org_c1", bid), b"abc", sidecar=False)
    _, body = await listing(client)
    [entry] = body["data"]["backups"]
    assert entry["filename"] == bid
    assert entry["sha256"] == ""
    if harness.name == "local":
        assert entry["mimetype"] == "application/octet-stream"


async def test_at_most_max_list_items_newest_first_counting_them_all(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway(harness.storage(), limits={"max_list_items": 2})
    # a millisecond apart, as uploads are: the store keeps the largest ids (UUIDv7), which
    # are then ordered by uploaded_at
    now = int(time.time() * 1000)
    ids = [new_uuid7(now - 5 + n) + ".tar.gz" for n in range(5)]
    for n, bid in enumerate(ids):
        harness.put_backup(location_for("org_c1", bid), b"y" * 100, "b.tar.gz",
                           uploaded_at=f"2026-11-01T00:00:0{n}Z")  # fmt: skip
    _, body = await listing(client)
    data = body["data"]
    if harness.name == "local":
        assert [b["id"] for b in data["backups"]] == [ids[4], ids[3]]
    assert len(data["backups"]) == 2
    assert (data["quota_used_bytes"], data["slots_used"], data["truncated"]) == (500, 5, True)


async def test_an_empty_or_unregistered_system_lists_empty(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway(harness.storage())
    for sid, org in (("sys_c1", "org_c1"), ("sys_unregistered", "org_c1")):
        resp, body = await listing(client, sid, org)
        assert resp.status == 200
        assert body["data"] == {
            "backups": [],
            "quota_used_bytes": 0,
            "slots_used": 0,
            "truncated": False,
        }


async def test_none_backend_is_503_but_unregistered_is_empty(start_gateway: StartGateway) -> None:
    client = await start_gateway({"backend": "none"})
    resp, body = await listing(client)
    assert (resp.status, body) == (
        503,
        {"code": 503, "message": "backup storage not configured", "data": {}},
    )
    resp, body = await listing(client, "sys_unregistered")
    assert resp.status == 200 and body["data"]["backups"] == []


@pytest.mark.parametrize(
    ("sid", "org", "kwargs", "status", "message"),
    [
        ("sys_c1", "org_c1", {"permissions": ["manage:systems"]}, 403, "insufficient permissions"),
        ("sys_nope", "org_c1", {}, 404, "system not found"),
        ("sys_deleted", "org_c1", {}, 404, "system not found"),
        ("sys_c2", "org_c1", {}, 403, "access denied to system"),
    ],
)
async def test_refusals_in_order(
    local_gateway: TestClient,
    local_harness: LocalHarness,
    sid: str,
    org: str,
    kwargs: dict[str, Any],
    status: int,
    message: str,
) -> None:
    local_harness.put(location_for("org_c2", new_backup_id()))
    claims_kwargs = dict(kwargs)
    if "permissions" in claims_kwargs:
        from jose import jwt

        from .support import SECRET, claims_for

        claims = claims_for(org, permissions=claims_kwargs["permissions"])
        claims["user"]["user_permissions"] = []
        token = jwt.encode(claims, SECRET, algorithm="HS256")
    else:
        token = token_for(org)
    resp = await local_gateway.get(URL.format(sid), headers=bearer(token))
    body = await resp.json()
    assert (resp.status, body["message"]) == (status, message)
    assert body["data"] == {}


async def test_no_token_is_401(local_gateway: TestClient) -> None:
    resp = await local_gateway.get(URL.format("sys_c1"))
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_a_missing_bucket_is_502_never_a_partial_or_empty_list(
    start_gateway: StartGateway, s3_server: Any
) -> None:
    client = await start_gateway(
        {"backend": "s3", "s3": s3_settings(s3_server.endpoint, "no-such-bucket-here")}
    )
    resp, body = await listing(client)
    assert (resp.status, body) == (
        502,
        {
            "code": 502,
            "message": "failed to list backups",
            "data": {"type": "external_api_error", "errors": []},
        },
    )
    assert "no-such-bucket" not in str(body)


async def test_an_unreadable_local_root_is_502_and_logged(
    start_gateway: StartGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start_gateway(
        {"backend": "local", "local": {"root": str(tmp_path / "gone"), "io": "inline"}}
    )
    with caplog.at_level(logging.WARNING):
        resp, body = await listing(client)
    assert resp.status == 502 and body["message"] == "failed to list backups"
    assert "gone" not in str(body)
    assert any("local storage read failed" in r.getMessage() for r in caplog.records)


async def test_a_system_folder_behind_a_symlink_lists_empty_and_warns(
    start_gateway: StartGateway,
    local_harness: LocalHarness,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await start_gateway(local_harness.storage())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / new_backup_id()).write_bytes(b"secret")
    (local_harness.root / "org_c1").mkdir(parents=True, exist_ok=True)
    os.symlink(elsewhere, local_harness.root / "org_c1" / "KEY-C1")
    with caplog.at_level(logging.WARNING):
        resp, body = await listing(client)
    assert resp.status == 200 and body["data"]["backups"] == []
    assert any("symlink" in r.getMessage() for r in caplog.records)


async def test_a_backup_file_that_is_a_symlink_is_not_listed(
    start_gateway: StartGateway, local_harness: LocalHarness, tmp_path: Path
) -> None:
    client = await start_gateway(local_harness.storage())
    real = new_backup_id()
    local_harness.put(location_for("org_c1", real))
    target = tmp_path / "outside"
    target.write_bytes(b"outside")
    os.symlink(target, local_harness.root / "org_c1" / "KEY-C1" / new_backup_id())
    _, body = await listing(client)
    assert [b["id"] for b in body["data"]["backups"]] == [real]


async def test_s3_lists_only_keys_directly_under_the_system_and_the_prefix(
    start_gateway: StartGateway, s3_server: Any
) -> None:
    h = S3Harness(s3_server.endpoint, f"lst-{os.urandom(4).hex()}", prefix="tenant-a/")
    client = await start_gateway(
        {"backend": "s3", "s3": s3_settings(h.endpoint, h.bucket, "tenant-a/")}
    )
    mine = new_backup_id()
    h.put(location_for("org_c1", mine))
    h.client.put_object(Bucket=h.bucket, Key=f"org_c1/KEY-C1/{new_backup_id()}", Body=b"unprefixed")
    h.client.put_object(
        Bucket=h.bucket, Key=f"tenant-a/org_c1/KEY-C1x/{new_backup_id()}", Body=b"x"
    )
    _, body = await listing(client)
    assert [b["id"] for b in body["data"]["backups"]] == [mine]
