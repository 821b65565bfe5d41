"""Limits that hold across processes (issue #28, 5 and 9): the upload rate, the brake on
failed appliance logins and the organization's quota, among the workers of one host
without Redis (`serve --workers 2`, the host's file) and among gateways sharing a Redis.

Before: each process counted for itself, so 2 workers accepted twice the rate, braked at
twice the failures, and let twice the organization's room in at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.backups.limits.host_file import HostFile
from gateway.backups.limits.host_reservations import HostBook
from gateway.backups.limits.redis_reservations import RedisBook
from gateway.backups.limits.reservations import Book, Claim, Refused, Reserved, Room
from gateway.redis_clients import redis_client

from .conftest import StartGateway
from .servers import RedisServer
from .support import (
    APPLIANCE_SECRETS,
    KEEP_EVERYTHING,
    LocalHarness,
    free_port,
    serve_gateway,
    wait_until,
    write_config,
)
from .test_retention import Workers
from .test_uploads import KEY, backups_of, basic, head_for, upload

ROUTE = "/api/systems/backups"
WRONG = "my_wrong.secret"
ORGANIZATION_FULL = "organization backup quota exceeded"
# 3 uploads of 3,000 bytes fit 10,000; a 4th would not
ROOM_FOR_THREE = {
    "max_bytes_per_organization": 10_000,
    "uploads_per_minute": 0,
    "uploads_per_hour": 0,
}
BODY = 3_000


def early_in_a_minute() -> int:
    """Wait until a minute has time left for a test's requests; that minute."""
    wait_until(lambda: time.time() % 60 < 40, "a minute with 20 s left", timeout=30)
    return int(time.time() // 60)


def post(port: int, body: bytes, secret: str = APPLIANCE_SECRETS["sys_c1"]) -> int:
    """One upload on a connection of its own (the kernel picks the worker): its status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "POST", ROUTE, body=body, headers={**basic(KEY, secret), "X-Filename": "b.tar.gz"}
        )
        answer = connection.getresponse()
        answer.read()
        return answer.status
    finally:
        connection.close()


def pids_answering(gateway: Workers, status: int) -> set[int]:
    return {
        r["pid"]
        for r in gateway.output.records()
        if r.get("route") == ROUTE and r.get("status") == status
    }


async def _response(reader: asyncio.StreamReader, status_line: bytes) -> tuple[int, Any]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return int(status_line.split()[1]), json.loads(await reader.readexactly(length))


async def two_step_uploads(ports: list[int], count: int) -> list[tuple[int, Any]]:
    """`count` uploads of BODY bytes spread over `ports`, each sent with `Expect:
    100-continue`: every one is admitted or refused before any body is sent, so none can
    commit (and free its reservation) while another is still being checked."""
    asked = []
    for i in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[i % len(ports)])
        writer.write(head_for(BODY, "Expect: 100-continue"))
        asked.append((reader, writer))

    async def interim(reader: asyncio.StreamReader) -> bytes:
        return await asyncio.wait_for(reader.readline(), 30)

    first = await asyncio.gather(*(interim(reader) for reader, _ in asked))

    async def finish(i: int) -> tuple[int, Any]:
        reader, writer = asked[i]
        try:
            if int(first[i].split()[1]) != 100:
                return await _response(reader, first[i])  # refused before the body
            await reader.readline()  # the blank line that ends the interim response
            writer.write(b"u" * BODY)
            return await _response(reader, await asyncio.wait_for(reader.readline(), 30))
        finally:
            writer.close()

    return list(await asyncio.gather(*(finish(i) for i in range(count))))


def bytes_held(harness: LocalHarness) -> int:
    folder = harness.root / "org_c1" / KEY
    return sum((folder / backup_id).stat().st_size for backup_id in backups_of(harness))


def assert_room_for_three(answers: list[tuple[int, Any]], harness: LocalHarness) -> None:
    assert sorted(status for status, _ in answers) == [201] * 3 + [413] * 9, answers
    assert {body["message"] for status, body in answers if status == 413} == {ORGANIZATION_FULL}
    stored = sorted(body["data"]["id"] for status, body in answers if status == 201)
    assert backups_of(harness) == stored
    assert bytes_held(harness) == 3 * BODY <= ROOM_FOR_THREE["max_bytes_per_organization"]


# --------------------------------------------------------------------------- workers, no Redis


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Any]:
    started: list[Workers] = []

    def start(retention: dict[str, Any], **extra: Any) -> Workers:
        started.append(Workers(tmp_path, retention, **extra))
        return started[-1]

    yield start
    for gateway in started:
        gateway.stop()


def test_the_upload_rate_holds_across_workers(workers: Any) -> None:
    """Before: 2 workers accepted 12 uploads a minute against 6."""
    gateway = workers({**KEEP_EVERYTHING, "uploads_per_minute": 6, "uploads_per_hour": 0})
    minute = early_in_a_minute()
    statuses = [post(gateway.port, b"r" * 100) for _ in range(20)]
    assert int(time.time() // 60) == minute
    assert statuses == [201] * 6 + [429] * 14
    assert len(backups_of(gateway.harness)) == 6
    state = gateway.harness.root.parent / "data"  # server.state_dir's default, made 0700
    assert state.stat().st_mode & 0o777 == 0o700
    assert (state / "limits.sqlite3").stat().st_mode & 0o777 == 0o600
    answered = pids_answering(gateway, 201) | pids_answering(gateway, 429)
    assert len(answered) == 2, "20 connections, both workers answered"


def test_the_failed_login_brake_holds_across_workers(workers: Any) -> None:
    """Before: 2 workers answered 10 wrong secrets 401 against a brake of 5."""
    gateway = workers({"failed_logins_per_minute": 5})
    minute = early_in_a_minute()
    statuses = [post(gateway.port, b"g", secret=WRONG) for _ in range(16)]
    assert int(time.time() // 60) == minute
    assert statuses == [401] * 5 + [429] * 11
    assert backups_of(gateway.harness) == []
    assert len(pids_answering(gateway, 401) | pids_answering(gateway, 429)) == 2
    assert post(gateway.port, b"right") == 201  # a correct credential is never braked


def test_the_organization_quota_holds_across_workers(workers: Any) -> None:
    """Before: each worker let 3 uploads into a room for 3."""
    gateway = workers(ROOM_FOR_THREE)
    answers = asyncio.run(two_step_uploads([gateway.port], 12))
    assert_room_for_three(answers, gateway.harness)
    assert len(pids_answering(gateway, 201) | pids_answering(gateway, 413)) == 2


def test_a_dead_workers_reservation_expires_at_its_deadline(workers: Any) -> None:
    """An upload in flight holds its room; killed with its worker, it holds it only until
    the upload's deadline (its checks, its body at the slowest rate, the commit's lock
    and operation: about 17 s here), never for good."""
    gateway = workers(
        {"max_bytes_per_organization": 5_000, "uploads_per_minute": 0, "uploads_per_hour": 0},
        server={"request_timeout_seconds": 2},
    )
    first = listening(gateway)

    async def die_holding_the_room() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(head_for(BODY, "Expect: 100-continue"))
        assert (await asyncio.wait_for(reader.readline(), 30)).split()[1] == b"100"
        for pid in first:  # the body never comes: its worker dies first, whichever it was
            os.kill(pid, signal.SIGKILL)
        writer.close()

    asyncio.run(die_holding_the_room())
    gateway.output.wait_for(lambda rs: len(listening(gateway) - first) == 2)
    assert post(gateway.port, b"x" * BODY) == 413  # the dead upload's room is still held
    wait_until(lambda: post(gateway.port, b"x" * BODY) == 201, "room again", 40, every=0.2)
    assert len(backups_of(gateway.harness)) == 1


def listening(gateway: Workers) -> set[int]:
    return {r["pid"] for r in gateway.output.records() if r["msg"].startswith("listening on")}


def test_an_unusable_state_dir_stops_start_up(tmp_path: Path) -> None:
    """Each worker counting for itself would multiply every limit: start-up stops, naming
    the key, before any worker starts."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    storage = LocalHarness(tmp_path / "backups").storage()
    config = write_config(tmp_path, free_port(), storage, server={"state_dir": str(blocker)})
    proc = serve_gateway(config, "--workers", "2")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2, out
    assert "server.state_dir" in out and str(blocker) in out


# --------------------------------------------------------------------------- one Redis


async def test_the_failed_login_brake_is_shared_through_redis(
    start_gateway: StartGateway, local_harness: LocalHarness, redis: RedisServer
) -> None:
    """Before: two gateways answered 6 wrong secrets 401 against a brake of 3."""
    storage = {**local_harness.storage(), "retention": {"failed_logins_per_minute": 3}}
    first = await start_gateway(storage, redis={"url": redis.url})
    second = await start_gateway(storage, redis={"url": redis.url})
    minute = early_in_a_minute()
    statuses = []
    for client in (first, second) * 4:
        statuses.append((await upload(client, b"g", secret=WRONG))[0].status)
    assert int(time.time() // 60) == minute
    assert statuses == [401] * 3 + [429] * 5
    keys = redis.client(1).keys("backup_gateway:failed_login:*")
    assert keys and all(redis.client(1).ttl(key) > 0 for key in keys)
    assert backups_of(local_harness) == []


async def test_the_organization_quota_is_shared_through_redis(
    start_gateway: StartGateway, local_harness: LocalHarness, redis: RedisServer
) -> None:
    """Before: each of two gateways let 3 uploads into a room for 3."""
    storage = {**local_harness.storage(), "retention": ROOM_FOR_THREE}
    first = await start_gateway(storage, redis={"url": redis.url})
    second = await start_gateway(storage, redis={"url": redis.url})
    assert first.port is not None and second.port is not None
    answers = await two_step_uploads([first.port, second.port], 12)
    assert_room_for_three(answers, local_harness)
    db = redis.client(1)
    # every reservation released when its upload ended; the platform's counter untouched
    assert db.hlen("backup_gateway:reserved:org:org_c1") == 0
    assert db.hlen(f"backup_gateway:reserved:system:{KEY}") == 0
    assert not db.exists("backup:org_usage:org_c1")


# --------------------------------------------------------------------------- the race


def without_counts(answer: Reserved | Refused) -> Reserved | Refused:
    """A book's answer but for the release counts it was given at (their values depend
    on what ran before in the same Redis)."""
    return dataclasses.replace(answer, releases=None)


@pytest.mark.parametrize("where", ["host file", "redis"])
async def test_a_release_between_reading_and_reserving_makes_the_upload_read_again(
    where: str, tmp_path: Path, redis: RedisServer
) -> None:
    """The interleaving no HTTP client can force, on the real books: upload B looks and
    reads 0 bytes stored; A reserves, commits 6,000 bytes (missed by B's read) and
    releases; B's reservation on its stale read is held but marked stale, so the upload
    reads storage again before its 100 Continue (`upload._admit`). Without a release in
    between, it is not: one read is enough."""
    client = redis_client(redis.url, 1)
    book: Book = (
        HostBook(HostFile.at(tmp_path / "state")) if where == "host file" else (RedisBook(client))
    )
    room = Room(0, 0, 10_000, 0)  # B read 0 bytes used
    seen = await book.look(KEY, "org_c1")
    a = Claim("upload-a", KEY, "org_c1", 6_000, 60)
    assert isinstance(await book.reserve(a, room, await book.look(KEY, "org_c1")), Reserved)
    await book.release(a)  # after A's commit
    b = Claim("upload-b", KEY, "org_c1", 6_000, 60)
    assert without_counts(await book.reserve(b, room, seen)) == Reserved(0, 0, True, True)
    c = Claim("upload-c", KEY, "org_c1", 3_000, 60)
    fresh = await book.look(KEY, "org_c1")
    held_by_b = Reserved(6_000, 6_000, False, False)
    assert without_counts(await book.reserve(c, room, fresh)) == held_by_b
    d = Claim("upload-d", KEY, "org_c1", 2_000, 60)
    assert without_counts(await book.reserve(d, room, fresh)) == Refused("organization")
    await client.aclose()
