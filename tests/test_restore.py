"""An appliance's own backups (DESIGN.md §10): list, restore (GET/HEAD), delete — with the
credentials it uploads with, on every backend and real S3 server.

Every answer is checked for its status and envelope and for what it leaves in storage;
the system is always the one the credentials name, never another's folder.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient

from .conftest import Harness, StartGateway
from .faultproxy import FaultProxy, S3Answer
from .support import (
    APPLIANCE_SECRETS,
    DIRECTORY,
    KEEP_EVERYTHING,
    LocalHarness,
    S3Harness,
    bearer,
    location_for,
    new_backup_id,
    s3_settings,
    scrape,
    token_for,
)
from .test_protection import protect
from .test_uploads import basic

LIST = "/api/systems/backups"
CHALLENGE = 'Basic realm="System Authentication"'
INVALID = {"code": 401, "message": "invalid system credentials", "data": {}}


def url(backup_id: str) -> str:
    return f"{LIST}/{backup_id}"


def put(harness: Harness, org: str, data: bytes, backup_id: str | None = None) -> str:
    bid = backup_id or new_backup_id(".tar.gz")
    harness.put_backup(
        location_for(org, bid), data, "backup.tar.gz", uploaded_at="2026-06-05T09:00:23Z"
    )
    return bid


def deleting(harness: Harness) -> dict[str, Any]:
    """The harness's storage with `retention.appliance_can_delete: true`."""
    storage = harness.storage()
    storage["retention"] = {**storage["retention"], "appliance_can_delete": True}
    return storage


def repr_digest(data: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"


async def envelope_of(resp: Any) -> tuple[int, dict[str, Any]]:
    return resp.status, await resp.json()


# --------------------------------------------------------------------------- credentials

BAD = {
    "none": {},
    "bearer token": bearer(token_for("org_c1")),
    "wrong secret": basic("KEY-C1", APPLIANCE_SECRETS["sys_c1b"]),
    "unknown key": basic("KEY-NOBODY", APPLIANCE_SECRETS["sys_c1"]),
    "deleted system": basic("KEY-DELETED", APPLIANCE_SECRETS["sys_deleted"]),
    "soft-deleted organization": basic("KEY-C-GONE", APPLIANCE_SECRETS["sys_c_gone"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_every_route_refuses_bad_credentials_with_the_basic_challenge(
    start_gateway: StartGateway, local_harness: LocalHarness, case: str
) -> None:
    client = await start_gateway(deleting(local_harness))
    bid = put(local_harness, "org_c1", b"data")
    gone_bid = put(local_harness, "org_c_gone", b"theirs")
    before = local_harness.keys()
    for method, path in [
        ("GET", LIST),
        ("GET", url(bid)),
        ("GET", url(gone_bid)),
        ("HEAD", url(bid)),
        ("DELETE", url(bid)),
        ("DELETE", url(gone_bid)),
    ]:
        resp = await client.request(method, path, headers=BAD[case])
        assert resp.status == 401, (method, path)
        assert resp.headers["WWW-Authenticate"] == CHALLENGE
        if method != "HEAD":
            assert await resp.json() == INVALID
    assert local_harness.keys() == before


async def test_a_suspended_system_is_refused(
    start_gateway: StartGateway, local_harness: LocalHarness, tmp_path: Path
) -> None:
    directory = json.loads(json.dumps(DIRECTORY))
    for system in directory["systems"]:
        if system["id"] == "sys_c1":
            system["suspended"] = True
    (tmp_path / "directory.yaml").write_text(yaml.safe_dump(directory))
    client = await start_gateway(deleting(local_harness))
    bid = put(local_harness, "org_c1", b"data")
    before = local_harness.keys()
    for method, path in [("GET", LIST), ("GET", url(bid)), ("DELETE", url(bid))]:
        resp = await client.request(method, path, headers=basic())
        assert (resp.status, await resp.json()) == (401, INVALID)
    assert local_harness.keys() == before


async def test_the_failed_login_brake_is_the_uploads(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    """One brake for every appliance route: failures on restore count toward the upload's
    429, and the right secret still passes."""
    client = await start_gateway(
        {**local_harness.storage(), "retention": {"failed_logins_per_minute": 3}}
    )
    wrong = basic("KEY-C1", "my_a.b")
    for path in (LIST, url(new_backup_id()), LIST):
        assert (await client.get(path, headers=wrong)).status == 401
    resp = await client.get(LIST, headers=wrong)
    assert resp.status == 429 and int(resp.headers["Retry-After"]) > 0
    resp = await client.post(LIST, data=b"x", headers=wrong)
    assert resp.status == 429
    assert (await client.get(LIST, headers=basic())).status == 200


# --------------------------------------------------------------------------- list


async def test_the_list_is_the_systems_own_as_a_user_sees_it(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway(harness.storage())
    mine = [put(harness, "org_c1", os.urandom(100 + i)) for i in range(3)]
    put(harness, "org_c1b", b"another system's")
    harness.put_backup(location_for("org_c1b", mine[0]), b"same id elsewhere", "x.tar.gz")
    status, body = await envelope_of(await client.get(LIST, headers=basic()))
    assert status == 200 and body["message"] == "backups listed"
    assert body["data"]["truncated"] is False
    users = await client.get("/api/systems/sys_c1/backups", headers=bearer(token_for("org_c1")))
    # the items exactly as the user's listing has them, in its order (newest first)
    assert body["data"]["backups"] == (await users.json())["data"]["backups"]
    assert sorted(b["id"] for b in body["data"]["backups"]) == sorted(mine)


async def test_the_list_is_bounded_and_says_truncated(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    client = await start_gateway(local_harness.storage(), limits={"max_list_items": 2})
    for _ in range(3):
        put(local_harness, "org_c1", b"x", new_backup_id())
    status, body = await envelope_of(await client.get(LIST, headers=basic()))
    assert status == 200 and body["data"]["truncated"] is True
    assert len(body["data"]["backups"]) == 2


async def test_no_storage_is_503_after_the_credentials(start_gateway: StartGateway) -> None:
    client = await start_gateway({"backend": "none"})
    for method, path in [("GET", LIST), ("GET", url(new_backup_id()))]:
        resp = await client.request(method, path, headers=basic())
        assert (await envelope_of(resp)) == (
            503,
            {"code": 503, "message": "backup storage not configured", "data": {}},
        )
    assert (await client.get(LIST)).status == 401  # the credentials come first


# --------------------------------------------------------------------------- restore


async def test_a_restore_sends_the_bytes_with_the_content_routes_headers(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway(harness.storage())
    data = os.urandom(300_000)
    bid = put(harness, "org_c1", data)
    resp = await client.get(url(bid), headers=basic())
    assert resp.status == 200
    assert await resp.read() == data
    h = resp.headers
    assert h["Content-Type"] == "application/octet-stream"
    assert h["Content-Disposition"].startswith('attachment; filename="backup_')
    assert h["Content-Disposition"].endswith('.tar.gz"')
    assert h["X-Content-Type-Options"] == "nosniff"
    assert h["Cache-Control"] == "no-store"
    assert h["Accept-Ranges"] == "bytes"
    assert h["Content-Length"] == str(len(data))
    assert h["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert h["Repr-Digest"] == repr_digest(data)
    head = await client.head(url(bid), headers=basic())
    assert head.status == 200 and await head.read() == b""
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["Repr-Digest"] == repr_digest(data)
    assert harness.exists(location_for("org_c1", bid))  # a restore changes nothing


async def test_ranges_resume_a_restore(start_gateway: StartGateway, harness: Harness) -> None:
    """A 20 MiB restore broken off, resumed from the middle: the exact bytes."""
    client = await start_gateway(harness.storage())
    data = os.urandom(20 << 20)
    bid = put(harness, "org_c1", data)
    etag = f'"{hashlib.sha256(data).hexdigest()}"'
    middle = 7_654_321
    first = await client.get(url(bid), headers={**basic(), "Range": f"bytes=0-{middle - 1}"})
    rest = await client.get(
        url(bid), headers={**basic(), "Range": f"bytes={middle}-", "If-Range": etag}
    )
    assert (first.status, rest.status) == (206, 206)
    assert rest.headers["Content-Range"] == f"bytes {middle}-{len(data) - 1}/{len(data)}"
    assert rest.headers["Repr-Digest"] == repr_digest(data)  # the whole backup's
    assert await first.read() + await rest.read() == data


@pytest.mark.parametrize(
    ("headers", "status", "part"),
    [
        ({"Range": "bytes=0-99"}, 206, slice(0, 100)),
        ({"Range": "bytes=-16"}, 206, slice(-16, None)),
        ({"Range": "bytes=0-1,5-6"}, 200, slice(None)),  # several: the whole body
        ({"Range": "bytes=10-", "If-Range": '"not-this-one"'}, 200, slice(None)),
        ({"Range": "bytes=10-", "If-Range": "Fri, 04 Dec 2026 10:00:00 GMT"}, 200, slice(None)),
        ({"Range": "bytes=-0"}, 416, None),
        ({"Range": "bytes=5000-"}, 416, None),
    ],
)
async def test_one_range_is_206_and_an_unsatisfiable_one_416(
    start_gateway: StartGateway,
    harness: Harness,
    headers: dict[str, str],
    status: int,
    part: slice | None,
) -> None:
    client = await start_gateway(harness.storage())
    data = os.urandom(5000)
    bid = put(harness, "org_c1", data)
    resp = await client.get(url(bid), headers={**basic(), **headers})
    assert resp.status == status
    if part is None:
        assert resp.headers["Content-Range"] == "bytes */5000"
        assert await resp.json() == {"code": 416, "message": "range not satisfiable", "data": {}}
    else:
        assert await resp.read() == data[part]


async def test_restore_refusals_in_order(start_gateway: StartGateway, harness: Harness) -> None:
    client = await start_gateway(harness.storage())
    theirs = put(harness, "org_c1b", b"system B's backup")
    before = harness.keys()
    resp = await client.get(url("../KEY-C1B/" + theirs), headers=basic())
    assert resp.status in (400, 404)  # a path that is no id never reaches storage
    resp = await client.get(url(theirs + ".exe"), headers=basic())
    assert (await envelope_of(resp))[0] == 400
    assert (await resp.json())["message"] == "validation failed"
    # another system's backup: A's folder is all A's credentials reach
    for method in ("GET", "HEAD"):
        resp = await client.request(method, url(theirs), headers=basic())
        assert resp.status == 404
    resp = await client.get(url(theirs), headers=basic())
    assert await resp.json() == {"code": 404, "message": "backup not found", "data": {}}
    assert harness.keys() == before


async def test_the_same_id_in_two_folders_gives_each_its_own(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway(harness.storage())
    bid = new_backup_id(".tar.gz")
    put(harness, "org_c1", b"A's bytes", bid)
    put(harness, "org_c1b", b"B's bytes", bid)
    resp = await client.get(url(bid), headers=basic())
    assert await resp.read() == b"A's bytes"
    resp = await client.get(url(bid), headers=basic("KEY-C1B", APPLIANCE_SECRETS["sys_c1b"]))
    assert await resp.read() == b"B's bytes"


async def test_restores_are_audited_and_counted(
    start_gateway: StartGateway, local_harness: LocalHarness, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start_gateway(local_harness.storage())
    data = os.urandom(10_000)
    bid = put(local_harness, "org_c1", data)
    with caplog.at_level(logging.INFO, logger="gateway.audit"):
        assert (await client.get(url(bid), headers=basic())).status == 200
        assert (await client.get(url(new_backup_id()), headers=basic())).status == 404
    lines = [
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "gateway.audit" and r.getMessage() == "backup restored"
    ]
    assert (lines[0]["backup_id"], lines[0]["bytes_sent"], lines[0]["outcome"]) == (
        bid,
        len(data),
        "complete",
    )
    assert lines[0]["system_id"] == "sys_c1" and lines[0]["actor"] == "appliance"
    assert lines[1]["outcome"] == "backup not found"
    complete = 'gateway_backup_restores_total{outcome="complete"}'
    assert await scrape(client, complete) == 1
    assert await scrape(client, 'gateway_backup_restores_total{outcome="backup_not_found"}') == 1
    assert await scrape(client, "gateway_backup_restored_bytes_total") == len(data)


# --------------------------------------------------------------------------- delete


async def test_appliances_may_not_delete_by_default(
    start_gateway: StartGateway, harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start_gateway(harness.storage())
    bid = put(harness, "org_c1", b"history")
    before = harness.keys()
    resp = await client.delete(url("not-an-id"), headers=basic())
    assert resp.status == 400  # the id grammar, then the refusal
    with caplog.at_level(logging.INFO, logger="gateway.audit"):
        resp = await client.delete(url(bid), headers=basic())
    assert await envelope_of(resp) == (
        403,
        {"code": 403, "message": "appliances may not delete backups", "data": {}},
    )
    assert harness.keys() == before
    audit = [r for r in caplog.records if r.getMessage() == "backup delete"]
    assert audit and audit[0].fields["actor"] == "appliance"  # type: ignore[attr-defined]
    assert audit[0].fields["decision"] == "deny"  # type: ignore[attr-defined]


async def test_an_allowed_appliance_deletes_its_own_unprotected_backups(
    start_gateway: StartGateway, harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start_gateway(deleting(harness))
    bid, kept = put(harness, "org_c1", b"one"), put(harness, "org_c1", b"two")
    theirs = put(harness, "org_c1b", b"B's", bid)  # the same id in B's folder
    assert (await protect(client, kept))[0] == 200
    before = harness.keys()
    # absent
    resp = await client.delete(url(new_backup_id()), headers=basic())
    assert await envelope_of(resp) == (
        404,
        {"code": 404, "message": "backup not found", "data": {}},
    )
    # protected: nothing deleted
    resp = await client.delete(url(kept), headers=basic())
    assert await envelope_of(resp) == (
        409,
        {"code": 409, "message": "backup is protected", "data": {}},
    )
    assert harness.keys() == before
    with caplog.at_level(logging.INFO, logger="gateway.audit"):
        resp = await client.delete(url(bid), headers=basic())
    assert await envelope_of(resp) == (
        200,
        {"code": 200, "message": "backup deleted", "data": {"id": bid}},
    )
    assert not harness.exists(location_for("org_c1", bid))
    assert harness.exists(location_for("org_c1b", theirs))  # B's is B's
    assert harness.exists(location_for("org_c1", kept))
    audit = [r.fields for r in caplog.records if r.getMessage() == "backup delete"]  # type: ignore[attr-defined]
    assert audit[-1]["actor"] == "appliance" and audit[-1]["outcome"] == "backup deleted"
    assert audit[-1]["system_id"] == "sys_c1"
    # the listing and the usage follow
    resp = await client.get(LIST, headers=basic())
    assert [b["id"] for b in (await resp.json())["data"]["backups"]] == [kept]


# --------------------------------------------------------------------------- store faults


async def faulty_gateway(
    start_gateway: StartGateway, s3_harness: S3Harness, proxy: FaultProxy
) -> TestClient:
    settings = s3_settings(proxy.endpoint, s3_harness.bucket, versioning="off")
    return await start_gateway(
        {
            "backend": "s3",
            "operation_timeout_seconds": 3.0,
            "s3": settings,
            "retention": KEEP_EVERYTHING,
        }
    )


async def test_a_store_failing_before_the_first_byte_is_502(
    start_gateway: StartGateway, s3_harness: S3Harness, proxy: FaultProxy
) -> None:
    client = await faulty_gateway(start_gateway, s3_harness, proxy)
    bid = put(s3_harness, "org_c1", os.urandom(1000))
    before = s3_harness.keys()
    proxy.faults.answer_every = S3Answer(500, "InternalError")
    resp = await client.get(url(bid), headers=basic())
    assert await envelope_of(resp) == (
        502,
        {
            "code": 502,
            "message": "failed to read backup",
            "data": {"type": "external_api_error", "errors": []},
        },
    )
    assert s3_harness.keys() == before


async def test_a_store_cut_mid_stream_is_a_short_read_never_a_whole_looking_file(
    start_gateway: StartGateway, s3_harness: S3Harness, proxy: FaultProxy
) -> None:
    client = await faulty_gateway(start_gateway, s3_harness, proxy)
    data = os.urandom(8 << 20)
    bid = put(s3_harness, "org_c1", data)
    # the HeadObject and state listing go on a connection of their own: only the GetObject's
    # answer is this long
    proxy.faults.reset_after_bytes = 3 << 20
    resp = await client.get(url(bid), headers=basic())
    assert resp.status == 200 and resp.headers["Content-Length"] == str(len(data))
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for piece in resp.content.iter_any():
            received += piece
    assert 0 < len(received) < len(data)
    assert received == data[: len(received)]  # what came is right; that it is short, visible
    assert await scrape(client, 'gateway_backup_restores_total{outcome="store_failed"}') == 1
    proxy.reset()
    again = await client.get(url(bid), headers={**basic(), "Range": f"bytes={len(received)}-"})
    assert received + await again.read() == data  # and the appliance resumes where it stopped
