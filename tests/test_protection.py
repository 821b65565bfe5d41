"""Protection (DESIGN.md §11): a protected backup is never pruned and never deleted.

Every answer of `PUT /api/systems/{id}/backups/{backup_id}/protection` in the order of a
delete's checks, and what it leaves in storage. Runs over every store that keeps state.
"""

from __future__ import annotations

import asyncio
import fcntl
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.backups.retention import RETENTION
from storage_backends.local import SIDECAR_SUFFIX

from .conftest import Harness, StartGateway
from .support import (
    LocalHarness,
    bearer,
    location_for,
    new_backup_id,
    token_for,
)
from .test_uploads import backups_of, upload


@pytest.fixture
def state_harness(harness: Harness) -> Harness:
    """Every store that keeps state: local disk in its two io modes, S3 on each server."""
    return harness


def url(backup_id: str, system_id: str = "sys_c1") -> str:
    return f"/api/systems/{system_id}/backups/{backup_id}/protection"


async def protect(
    client: TestClient,
    backup_id: str,
    body: Any = True,
    org: str = "org_c1",
    system_id: str = "sys_c1",
    **token: Any,
) -> tuple[int, dict[str, Any]]:
    payload = {"protected": body} if isinstance(body, bool) else body
    data = payload if isinstance(payload, (bytes, str)) else None
    resp = await client.put(
        url(backup_id, system_id),
        headers=bearer(token_for(org, **token)),
        **({"data": data} if data is not None else {"json": payload}),
    )
    return resp.status, await resp.json()


async def listed(client: TestClient) -> dict[str, dict[str, Any]]:
    resp = await client.get("/api/systems/sys_c1/backups", headers=bearer(token_for("org_c1")))
    assert resp.status == 200
    return {b["id"]: b for b in (await resp.json())["data"]["backups"]}


async def test_a_protected_backup_is_never_deleted(
    start_gateway: StartGateway, state_harness: Harness
) -> None:
    client = await start_gateway(state_harness.storage())
    bid = new_backup_id()
    state_harness.put(location_for("org_c1", bid))
    status, body = await protect(client, bid)
    assert (status, body) == (
        200,
        {
            "code": 200,
            "message": "backup protection updated",
            "data": {"system_id": "sys_c1", "backup_id": bid, "protected": True},
        },
    )
    item = (await listed(client))[bid]
    assert item["protected"] is True and "protected" in item["kept_by"]
    for path in (
        f"/api/systems/sys_c1/backups/{bid}",
        f"/api/systems/sys_c1/backups/{bid}/download",
    ):
        resp = await client.delete(path, headers=bearer(token_for("org_c1")))
        assert (resp.status, await resp.json()) == (
            409,
            {"code": 409, "message": "backup is protected", "data": {}},
        )
        assert state_harness.exists(location_for("org_c1", bid))
    # idempotent, then unprotected, then deleted
    assert (await protect(client, bid))[0] == 200
    assert (await protect(client, bid, False))[0] == 200
    assert (await listed(client))[bid]["protected"] is False
    resp = await client.delete(
        f"/api/systems/sys_c1/backups/{bid}", headers=bearer(token_for("org_c1"))
    )
    assert resp.status == 200
    assert not state_harness.exists(location_for("org_c1", bid))


@pytest.mark.parametrize("io", ["process", "inline"])
async def test_a_delete_meets_a_change_holding_the_systems_lock(
    start_gateway: StartGateway, tmp_path: Path, io: str
) -> None:
    """On local disk the look at protection and the unlink are one step in the store, under
    the folder's shared lock taken without waiting. While another process changes the
    system (a pruning run, a protection change: the lock held exclusively), the delete
    waits for it as any delete does — here longer than a request waits: 503, the backup
    left — and goes through once the lock is free."""
    harness = LocalHarness(tmp_path / "backups", io=io)
    client = await start_gateway(harness.storage())
    bid = new_backup_id()
    harness.put(location_for("org_c1", bid), b"12345")
    path = f"/api/systems/sys_c1/backups/{bid}"
    lock = harness.root / "org_c1" / location_for("org_c1", bid).system_key / ".retention.lock"
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        resp = await client.delete(path, headers=bearer(token_for("org_c1")))
        assert (resp.status, (await resp.json())["message"]) == (503, "backup busy, retry later")
        assert resp.headers["Retry-After"] == "1"
        assert harness.exists(location_for("org_c1", bid))
    resp = await client.delete(path, headers=bearer(token_for("org_c1")))
    assert resp.status == 200
    assert not harness.exists(location_for("org_c1", bid))
    assert not (lock.parent / (bid + SIDECAR_SUFFIX)).exists()


async def test_a_protected_backup_is_never_pruned(
    start_gateway: StartGateway, state_harness: Harness
) -> None:
    client = await start_gateway(
        {
            **state_harness.storage(),
            "retention": {"keep_last": 1, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0},
        }
    )
    first = (await upload(client, b"the good one"))[1]["data"]["id"]
    assert (await protect(client, first))[0] == 200
    ids = [(await upload(client, b"junk"))[1]["data"]["id"] for _ in range(3)]
    await client.app[RETENTION].settled()
    assert backups_of(state_harness) == sorted([first, ids[-1]])
    items = await listed(client)
    assert items[first]["kept_by"] == ["protected"]
    assert items[ids[-1]]["kept_by"] == ["last"]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'{"protected": "yes"}',
        b'{"protected": 1}',
        b'{"protected": true, "until": 5}',
        b'{"Protected": true}',
        b"{" + b" " * 2000 + b"}",
    ],
)
async def test_a_body_that_is_not_the_object_is_400(
    start_gateway: StartGateway, state_harness: Harness, body: bytes
) -> None:
    client = await start_gateway(state_harness.storage())
    bid = new_backup_id()
    state_harness.put(location_for("org_c1", bid))
    status, answer = await protect(client, bid, body)
    assert status == 400
    assert answer["message"] == "validation failed"
    assert answer["data"]["errors"][0]["key"] == "protected"
    assert (await listed(client))[bid]["protected"] is False


async def test_too_many_protected_is_409(
    start_gateway: StartGateway, state_harness: Harness
) -> None:
    client = await start_gateway(
        {**state_harness.storage(), "retention": {"max_protected_per_system": 2}}
    )
    bids = [new_backup_id() for _ in range(3)]
    for bid in bids:
        state_harness.put(location_for("org_c1", bid))
    assert (await protect(client, bids[0]))[0] == 200
    assert (await protect(client, bids[1]))[0] == 200
    status, body = await protect(client, bids[2])
    assert (status, body) == (
        409,
        {"code": 409, "message": "too many protected backups", "data": {}},
    )
    protected = {b for b, i in (await listed(client)).items() if i["protected"]}
    assert protected == set(bids[:2])
    # at the limit, protecting one already protected is still 200 (nothing changes)
    assert (await protect(client, bids[0]))[0] == 200


async def test_concurrent_protections_never_pass_the_limit(
    start_gateway: StartGateway, state_harness: Harness
) -> None:
    # keep_last 6: the start-up sweep, which may run after the puts on a busy machine,
    # must not prune the three that the default rules leave out (a 404 among the answers)
    retention = {"max_protected_per_system": 2, "keep_last": 6}
    client = await start_gateway({**state_harness.storage(), "retention": retention})
    bids = [new_backup_id() for _ in range(6)]
    for bid in bids:
        state_harness.put(location_for("org_c1", bid))
    answers = await asyncio.gather(*(protect(client, bid) for bid in bids))
    assert sorted(a[0] for a in answers) == [200, 200, 409, 409, 409, 409]
    assert sum(i["protected"] for i in (await listed(client)).values()) == 2


async def test_the_order_of_checks(start_gateway: StartGateway, state_harness: Harness) -> None:
    client = await start_gateway(state_harness.storage())
    bid = new_backup_id()
    state_harness.put(location_for("org_c1", bid))
    resp = await client.put(url(bid), json={"protected": True})
    assert resp.status == 401
    read_only = await protect(client, bid, permissions=["read:systems"])
    assert read_only == (403, {"code": 403, "message": "insufficient permissions", "data": {}})
    assert (await protect(client, "not-an-id"))[0] == 400
    assert (await protect(client, bid, system_id="sys_nope"))[1]["message"] == "system not found"
    other = await protect(client, bid, org="org_c2")
    assert other == (403, {"code": 403, "message": "access denied to system", "data": {}})
    missing = await protect(client, new_backup_id())
    assert missing == (404, {"code": 404, "message": "backup not found", "data": {}})
    assert (await listed(client))[bid]["protected"] is False


async def test_no_storage_is_503(start_gateway: StartGateway) -> None:
    client = await start_gateway({"backend": "none"})
    status, body = await protect(client, new_backup_id())
    assert (status, body["message"]) == (503, "backup storage not configured")
