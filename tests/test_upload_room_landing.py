"""An upload landing is never counted twice against a quota (issue #26, point 0's loop).

Upload A commits: its bytes are in what the store lists from that moment, while its
reservation still holds them until A's answer and release. Upload B, checking its room in
that window, read A's bytes and counted A's reservation too: 413 `organization backup
quota exceeded` on room that was there (seen once in 40 runs of the retention suite's
twelve concurrent uploads under load). Now A marks its reservation landing before its
commit, and a check that fails only through landing reservations waits for their release
and checks again.

The fault proxy holds A's CopyObject answer (the store has copied, A's reservation holds)
until the test lets it go: the window made as long as the test needs.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.backups.limits.host_file import HostFile
from gateway.backups.limits.host_reservations import HostBook
from gateway.backups.limits.redis_reservations import RedisBook
from gateway.backups.limits.reservations import (
    Book,
    Claim,
    Refused,
    Reservations,
    Reserved,
    Room,
)
from gateway.redis_clients import redis_client

from .conftest import StartGateway
from .faultproxy import FaultProxy
from .servers import RedisServer
from .support import KEEP_EVERYTHING, S3Harness, eventually, s3_settings, scrape
from .test_uploads import KEY, backups_of, upload

COPY_OBJECT = re.compile(rb"(?im)^x-amz-copy-source:")
ORGANIZATION_FULL = "organization backup quota exceeded"
WAITS = "gateway_upload_room_waits_total"
HOLD = 30.0  # seconds A's commit answer is held at most: far beyond what the test takes
QUOTAS = {  # 10,000 bytes for the system or its organization: two of 6,000 do not fit
    "organization": ({"max_bytes_per_organization": 10_000}, ORGANIZATION_FULL),
    "system": ({"max_bytes_per_system": 10_000}, "system backup quota exceeded"),
}


async def gateway(
    start_gateway: StartGateway,
    harness: S3Harness,
    proxy: FaultProxy,
    where: str,
    redis: Any,
    quota: dict[str, int],
) -> TestClient:
    # the hold (HOLD) within the store's read timeout and operation time: the test, not a
    # timeout, ends it
    settings = s3_settings(
        proxy.endpoint,
        harness.bucket,
        versioning="off",
        max_attempts=1,
        connect_timeout_seconds=5,
        read_timeout_seconds=HOLD + 10,
    )
    storage = {
        "backend": "s3",
        "operation_timeout_seconds": HOLD + 10,
        "s3": settings,
        "retention": {
            **KEEP_EVERYTHING,
            "uploads_per_minute": 0,
            "uploads_per_hour": 0,
            "duplicate_window_seconds": 0,
            **quota,
        },
    }
    sections = {"redis": {"url": redis.url}} if where == "redis" else {}
    return await start_gateway(storage, **sections)


def stored_bytes(harness: S3Harness) -> int:
    listed = harness.client.list_objects_v2(Bucket=harness.bucket, Prefix="org_c1/")
    return sum(item["Size"] for item in listed.get("Contents", []))


@pytest.mark.parametrize("quota", QUOTAS)
@pytest.mark.parametrize("where", ["host file", "redis"])
async def test_an_upload_checking_while_another_lands_waits_for_it(
    start_gateway: StartGateway,
    s3_harness: S3Harness,
    proxy: FaultProxy,
    redis: RedisServer,
    where: str,
    quota: str,
) -> None:
    room, full = QUOTAS[quota]
    client = await gateway(start_gateway, s3_harness, proxy, where, redis, room)
    proxy.faults.hold_answers = [(COPY_OBJECT, HOLD)]
    first = asyncio.ensure_future(upload(client, b"a" * 6_000))
    # A is in the store, its answer held: its reservation still holds its 6,000 bytes
    await eventually(lambda: proxy.faults.held == 1, "A's commit answer held")
    await eventually(lambda: len(backups_of(s3_harness)) == 1, "A's bytes in the store")
    second = asyncio.ensure_future(upload(client, b"b" * 3_000))
    # 6,000 + 3,000 fit 10,000: B waits for A's release instead of counting A twice
    await eventually(lambda: scrape(client, WAITS), "B waiting for A's release")
    assert not first.done() and not second.done()
    proxy.faults.release_held.set()
    (a, a_body), (b, b_body) = await first, await second
    assert (a.status, b.status) == (201, 201), (a_body, b_body)
    assert sorted(backups_of(s3_harness)) == sorted([a_body["data"]["id"], b_body["data"]["id"]])
    # a third does not fit (9,000 + 3,000): refused at once, nothing landing to wait for
    c, c_body = await upload(client, b"c" * 3_000)
    assert (c.status, c_body) == (413, {"code": 413, "message": full, "data": {}})
    assert await scrape(client, WAITS) == 1
    assert stored_bytes(s3_harness) == 9_000 and len(backups_of(s3_harness)) == 2
    if where == "redis":  # every reservation and landing mark gone with its upload
        db = redis.client(1)
        assert db.keys("backup_gateway:reserved:*") == []
        assert db.keys("backup_gateway:landing:*") == []


@pytest.mark.parametrize("where", ["host file", "redis"])
async def test_only_a_refusal_through_landing_uploads_waits(
    where: str, tmp_path: Path, redis: RedisServer
) -> None:
    """The books' side, each step as an upload takes it: a refusal says it would fit but
    for uploads landing (`settling`) only when it would; the wait ends with a release."""
    client = redis_client(redis.url, 1)
    host = HostFile.at(tmp_path / "state")
    book: Book = HostBook(host) if where == "host file" else RedisBook(client)
    reservations = Reservations(book, HostBook(HostFile.in_memory()))
    org = "org_c1"
    try:
        a = Claim("upload-a", KEY, org, 6_000, 60)
        assert isinstance(
            await book.reserve(a, Room(0, 0, 10_000, 0), await book.look(KEY, org)), Reserved
        )
        # A in flight, not landing: its bytes are in no read, so a refusal is final
        b = Claim("upload-b", KEY, org, 6_000, 60)
        seen = await book.look(KEY, org)
        refused = await book.reserve(b, Room(0, 0, 10_000, 0), seen)
        assert isinstance(refused, Refused) and not refused.settling
        await reservations.landing(a)
        seen = await book.look(KEY, org)
        assert (seen.organization_bytes, seen.organization_landing) == (6_000, 6_000)
        # B read A's bytes stored (used 6,000) and counts A's reservation: it would fit
        # without the landing one
        room = Room(0, 0, 10_000, 6_000)
        c = Claim("upload-c", KEY, org, 3_000, 60)
        refused = await book.reserve(c, room, seen)
        assert isinstance(refused, Refused) and refused.settling
        assert refused.releases is not None
        # ... but not one larger than the room left once A is counted once
        refused_too = await book.reserve(Claim("upload-d", KEY, org, 5_000, 60), room, seen)
        assert isinstance(refused_too, Refused) and not refused_too.settling
        # no release, no end to the wait but its bound; A's release ends it
        soon = asyncio.get_running_loop().time() + 0.05
        assert not await reservations.released_since(KEY, org, refused.releases, soon)
        waits = reservations.waiting_room(KEY, org, 30)
        waiting = asyncio.ensure_future(waits.worth_another_check(True, refused.releases))
        await book.release(a)
        assert await waiting
        fresh = await book.look(KEY, org)
        assert (fresh.organization_bytes, fresh.organization_landing) == (0, 0)
        assert isinstance(await book.reserve(c, room, fresh), Reserved)
        await book.release(c)
        # not worth it for a refusal that would stand without the landing ones
        assert not await waits.worth_another_check(False, refused.releases)
    finally:
        await client.aclose()
        host.close()
    if where == "redis":
        db = redis.client(1)
        assert db.keys("backup_gateway:landing:*") == []
