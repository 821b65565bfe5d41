"""Beside the real platform: its PostgreSQL as the directory, its Redis for revocations and the
usage counter, its tokens — all against real servers (DESIGN.md §3, §7)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient
from jose import jwt

from gateway import create_app
from gateway.config import PostgresDirectoryConfig
from gateway.directory import DIRECTORY as DIRECTORY_KEY
from gateway.directory import (
    DirectoryUnavailable,
    InMemoryDirectory,
    Organization,
    parse_directory,
)
from gateway.directory import postgres as postgres_queries
from gateway.directory.cache import CachedDirectory
from gateway.directory.file import FileDirectory
from gateway.directory.postgres import PostgresDirectory

from .conftest import StartGateway, postgres_directory
from .servers import PlatformDatabase, PostgresServer, RedisServer, TcpRelay
from .support import (
    DIRECTORY,
    ORGANIZATIONS,
    SECRET,
    LocalHarness,
    OutputWatcher,
    bearer,
    claims_for,
    delete_as,
    eventually,
    free_port,
    http,
    location_for,
    make_config,
    new_backup_id,
    scraped_is,
    serve_gateway,
    system_id_of,
    token_for,
    wait_for_port,
    write_config,
)
from .test_uploads import backups_of, upload

# --------------------------------------------------------------------------- PostgreSQL


async def pg_gateway(
    start_gateway: StartGateway,
    harness: LocalHarness,
    database: PlatformDatabase,
    **settings: Any,
) -> TestClient:
    client = await start_gateway(
        harness.storage(), directory=postgres_directory(database, **settings)
    )
    # as a load balancer would: traffic once ready (its first case scan has answered), so a
    # test's lock on a table holds back only what the test means it to; on a connection of
    # its own, so the test's requests all start alike (none on a kept-alive one)
    assert (await client.get("/readyz", headers={"Connection": "close"})).status == 200
    return client


async def test_a_delete_is_authorized_from_the_database(
    start_gateway: StartGateway, local_harness: LocalHarness, platform_db: PlatformDatabase
) -> None:
    client = await pg_gateway(start_gateway, local_harness, platform_db)
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    resp = await delete_as(client, bid, "sys_c1", "org_r1")  # the customer's reseller
    assert resp.status == 200, await resp.text()
    assert not local_harness.exists(location_for("org_c1", bid))


@pytest.mark.parametrize(
    ("table", "deleted", "caller"),
    [
        ("customers", "org_c1", "org_r1"),  # the system's own organization
        ("resellers", "org_r1", "org_d1"),  # the reseller a distributor reaches it through
        ("distributors", "org_d1", "org_d1"),  # the caller's own, asked beside the system
    ],
)
async def test_soft_deleting_an_organization_refuses_within_cache_seconds(
    start_gateway: StartGateway,
    local_harness: LocalHarness,
    platform_db: PlatformDatabase,
    table: str,
    deleted: str,
    caller: str,
) -> None:
    """After `UPDATE customers SET deleted_at = now()`, its reseller's deletes are refused
    once the cached allow is cache_seconds old; until then it may stand, never longer. So
    with a reseller and its distributor."""
    client = await pg_gateway(start_gateway, local_harness, platform_db, cache_seconds=1)
    first = new_backup_id()
    local_harness.put(location_for("org_c1", first))
    assert (await delete_as(client, first, "sys_c1", caller)).status == 200  # cached now
    cached_by = time.monotonic()  # the allow was asked before this: stale from + 1 s
    await platform_db.execute(
        f"UPDATE {table} SET deleted_at = now() WHERE logto_id = $1",  # noqa: S608 (a test's table)
        deleted,
    )
    await until_refused(
        lambda bid: delete_as(client, bid, "sys_c1", caller),
        local_harness,
        refused=403,
        stale_from=cached_by + 1,
    )


async def until_refused(
    delete: Callable[[str], Awaitable[Any]],
    harness: LocalHarness,
    refused: int,
    stale_from: float,
) -> Any:
    """Deletes of fresh backups of sys_c1 until one is `refused` (that backup left in
    place); the refusal. Each 200 before it must have been asked before `stale_from`: the
    monotonic time from which no allow may be served any more (a cached one has grown
    older than its cache_seconds), however slow the machine."""
    deadline = stale_from + 30
    while True:
        bid = new_backup_id()
        location = location_for("org_c1", bid)
        harness.put(location)
        asked = time.monotonic()
        resp = await delete(bid)
        if resp.status == refused:
            assert harness.exists(location)
            return resp
        assert resp.status == 200, await resp.text()
        assert asked < stale_from, f"a stale allow served {asked - stale_from:.3f}s late"
        assert asked < deadline, "never refused"
        await asyncio.sleep(0.02)  # the pace of the retries, not a wait for anything


async def test_suspension_changes_nothing_for_deletes(
    start_gateway: StartGateway, local_harness: LocalHarness, platform_db: PlatformDatabase
) -> None:
    await platform_db.execute("UPDATE systems SET suspended_at = now() WHERE id = 'sys_c1'")
    client = await pg_gateway(start_gateway, local_harness, platform_db)
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    assert (await delete_as(client, bid)).status == 200


async def test_organization_id_is_the_logto_id_and_a_key_counts_once_registered(
    start_gateway: StartGateway, local_harness: LocalHarness, platform_db: PlatformDatabase
) -> None:
    # The table's own id is never an organization id; an unregistered key holds no backups.
    await platform_db.execute(
        "INSERT INTO systems (id, name, organization_id, system_key) "
        "VALUES ('sys_pending', 'p', 'org_c1', 'KEY-PENDING')"
    )
    client = await pg_gateway(start_gateway, local_harness, platform_db)
    bid = new_backup_id()
    pending = location_for("org_c1", bid).__class__("org_c1", "KEY-PENDING", bid)
    local_harness.put(pending)
    resp = await delete_as(client, bid, "sys_pending", "org_c1")
    assert (resp.status, (await resp.json())["message"]) == (404, "backup not found")
    assert local_harness.exists(pending)
    other = new_backup_id()
    local_harness.put(location_for("org_c1", other))
    resp = await client.delete(
        f"/api/systems/sys_c1/backups/{other}", headers=bearer(token_for("row-8", "customer"))
    )
    assert resp.status == 403  # "row-8" is org_c1's table id, not an organization id
    assert local_harness.exists(location_for("org_c1", other))


@pytest.mark.parametrize(
    "system_id",
    [
        "sys_c1'--",
        "sys_c1' OR '1'='1",
        "$1",
        "sys_c1;DROP TABLE systems",
        "a" * 10_000,
        "sys%00c1",
        "%27",
        "sys_c1\\",
        "ＳＹＳ",
    ],
)
async def test_hostile_system_ids_are_404_never_500(
    start_gateway: StartGateway,
    local_harness: LocalHarness,
    platform_db: PlatformDatabase,
    system_id: str,
) -> None:
    client = await pg_gateway(start_gateway, local_harness, platform_db)
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    resp = await client.delete(
        f"/api/systems/{system_id}/backups/{bid}", headers=bearer(token_for("org_owner"))
    )
    assert resp.status in (400, 404), await resp.text()
    assert local_harness.exists(location_for("org_c1", bid))
    count = await platform_db.execute("SELECT 1 FROM systems")
    assert count == "SELECT 18"  # the table is intact


@pytest.mark.parametrize(
    ("colliding_row", "refused"),
    [
        # another system whose key is sys_c1's but for case: both refused
        (
            "INSERT INTO systems (id, name, organization_id, system_key, registered_at)"
            " VALUES ('sys_twin', 'twin', 'org_c2', 'key-c1', now())",
            "system_key",
        ),
        # another organization (deleted, in another table) whose logto_id is org_c1's but for
        # case: every system of org_c1 refused
        (
            "INSERT INTO resellers (id, logto_id, name, custom_data, deleted_at)"
            " VALUES ('row-twin', 'ORG_C1', 'twin', '{}', now())",
            "organization_id",
        ),
    ],
)
async def test_a_system_whose_folders_collide_in_case_is_never_served(
    start_gateway: StartGateway,
    local_harness: LocalHarness,
    platform_db: PlatformDatabase,
    caplog: pytest.LogCaptureFixture,
    colliding_row: str,
    refused: str,
) -> None:
    # On a case-insensitive disk the two would share a folder: one tenant's caller would
    # reach the other's backups (hostile input #6). Neither is served: 404, logged, within
    # case_scan_seconds (a scan in the background: the platform has no index on lower()).
    client = await pg_gateway(
        start_gateway, local_harness, platform_db, cache_seconds=0, case_scan_seconds=0.5
    )
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    assert (
        await client.get("/api/systems/sys_c1/backups", headers=bearer(token_for("org_c1")))
    ).status == 200
    await platform_db.execute(colliding_row)
    await twins_seen(client, 1, "a case scan after the insert")  # every 0.5 s
    for caller in ("org_c1", "org_owner"):
        resp = await client.delete(
            f"/api/systems/sys_c1/backups/{bid}", headers=bearer(token_for(caller))
        )
        assert (resp.status, (await resp.json())["message"]) == (404, "system not found")
    uploaded, _ = await upload(client, b"not into a shared folder")
    assert uploaded.status == 401
    if refused == "system_key":
        twin = await client.get(
            "/api/systems/sys_twin/backups", headers=bearer(token_for("org_owner"))
        )
        assert twin.status == 404
    assert local_harness.exists(location_for("org_c1", bid))
    assert backups_of(local_harness) == [bid]
    assert f"system sys_c1 refused: its {refused} differs from another only in case" in caplog.text
    assert "case scan: " in caplog.text  # the scan that found it says so once
    metrics = await (await client.get("/metrics")).text()
    assert "gateway_directory_case_twins 1.0" in metrics
    await platform_db.execute("DELETE FROM systems WHERE id = 'sys_twin'")
    await platform_db.execute("DELETE FROM resellers WHERE id = 'row-twin'")
    await twins_seen(client, 0, "a case scan after the delete")
    assert (await list_as(client, "org_owner")).status == 200  # served again once unique
    assert (await delete_as(client, bid)).status == 200


async def twins_seen(client: TestClient, count: int, what: str) -> None:
    """Until the latest case scan that answered found `count` twins (its /metrics gauge:
    lookups check against that scan from then on). Scans run every case_scan_seconds; the
    bound is a loaded machine's, not the contract's."""
    sample = "gateway_directory_case_twins"
    await eventually(lambda: scraped_is(client, sample, count), what, timeout=10)


async def _status_is(client: TestClient, path: str, status: int) -> bool:
    resp = await client.get(path)
    await resp.read()
    return resp.status == status


async def list_as(client: TestClient, caller: str, system_id: str = "sys_c1") -> Any:
    resp = await client.get(f"/api/systems/{system_id}/backups", headers=bearer(token_for(caller)))
    await resp.read()
    return resp


async def test_a_reload_looks_for_twins_in_case_at_once(
    start_gateway: StartGateway, local_harness: LocalHarness, platform_db: PlatformDatabase
) -> None:
    # SIGHUP (reload_now, which its handler calls) does not wait for the next scan.
    client = await pg_gateway(
        start_gateway, local_harness, platform_db, cache_seconds=0, case_scan_seconds=3600
    )
    assert (await list_as(client, "org_owner")).status == 200
    await platform_db.execute(
        "INSERT INTO systems (id, name, organization_id, system_key, registered_at)"
        " VALUES ('sys_twin', 'twin', 'org_c2', 'Key-c1', now())"
    )
    assert (await list_as(client, "org_owner")).status == 200  # the next scan is an hour away
    client.app[DIRECTORY_KEY].reload_now()
    await twins_seen(client, 1, "the reload's scan")  # no other scan comes within the hour
    assert (await list_as(client, "org_owner")).status == 404


async def test_systems_are_not_served_unchecked_when_the_scan_cannot_answer(
    start_gateway: StartGateway,
    local_harness: LocalHarness,
    platform_db: PlatformDatabase,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.directory.case_twins")
    # The scan reads the organization tables; the Owner's lookups read only systems. With
    # distributors locked the scans time out: past twice case_scan_seconds the last one is
    # not trusted, and lookups are 503 (and /readyz says why), never served unchecked.
    client = await pg_gateway(
        start_gateway,
        local_harness,
        platform_db,
        cache_seconds=0,
        case_scan_seconds=0.5,
        statement_timeout_seconds=0.5,
    )
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    assert (await list_as(client, "org_owner")).status == 200
    async with platform_db.locked("distributors"):
        # once the last scan that answered is older than twice case_scan_seconds, /readyz
        # says the directory is unavailable (it waited for a scan, which failed)
        await eventually(lambda: _status_is(client, "/readyz", 503), "an untrusted scan")
        started = time.monotonic()
        resp = await delete_as(client, bid, org="org_owner")
        assert (resp.status, (await resp.json())["message"]) == (503, "directory unavailable")
        # it waited for one more scan (bounded by 1.5 s), no longer: a loaded machine's margin
        assert time.monotonic() - started < 1.5 + 5
        ready = await client.get("/readyz")
        assert ready.status == 503
        assert "directory" in await ready.text()
    assert local_harness.exists(location_for("org_c1", bid))

    async def answered() -> Any:  # recovers: the next scan answers
        resp = await delete_as(client, bid, org="org_owner")
        return resp if resp.status != 503 else None

    resp = await eventually(answered, "a delete answered once the scan answers again")
    assert resp.status == 200
    assert not local_harness.exists(location_for("org_c1", bid))
    # the outage's several failed scans are one warning, and its end one line
    assert caplog.text.count("case scan failed") == 1, caplog.text
    assert "case scan answers again" in caplog.text


async def test_a_slow_database_is_503_within_a_bound_then_recovers(
    start_gateway: StartGateway, local_harness: LocalHarness, platform_db: PlatformDatabase
) -> None:
    client = await pg_gateway(
        start_gateway, local_harness, platform_db, cache_seconds=0, statement_timeout_seconds=0.5
    )
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    async with platform_db.locked("systems"):
        started = time.monotonic()
        resp = await delete_as(client, bid)
        elapsed = time.monotonic() - started
        body = await resp.json()
        assert (resp.status, body) == (
            503,
            {"code": 503, "message": "directory unavailable", "data": {}},
        )
        assert resp.headers["Retry-After"] == "1"
        # the statement timeout (0.5 s) answered it, not the lock (held until the block's
        # end): the bound is a loaded machine's
        assert elapsed < 0.5 + 5, elapsed
        ready = await client.get("/readyz")
        assert ready.status == 200  # SELECT 1 does not touch the locked table
    assert local_harness.exists(location_for("org_c1", bid))
    assert (await delete_as(client, bid)).status == 200  # recovered by itself


async def test_an_exhausted_pool_is_503_not_a_hang(
    start_gateway: StartGateway, local_harness: LocalHarness, platform_db: PlatformDatabase
) -> None:
    # The pool's one connection is held by the deletes' system lookup (the table locked);
    # the appliance's upload needs another lookup (by key): it waits for the pool, then for
    # the lock, and every answer is 503 within the bound, nothing deleted or stored.
    client = await pg_gateway(
        start_gateway,
        local_harness,
        platform_db,
        cache_seconds=0,
        pool_size=1,
        statement_timeout_seconds=0.5,
    )
    backups = {org: new_backup_id() for org in ("org_c1", "org_c2", "org_r1", "org_d1")}
    for org, bid in backups.items():
        local_harness.put(location_for(org, bid))
    async with platform_db.locked("systems"):
        started = time.monotonic()
        deletes = [
            client.delete(
                f"/api/systems/{system_id_of(org)}/backups/{bid}",
                headers=bearer(token_for("org_owner")),
            )
            for org, bid in backups.items()
        ]
        answers, (uploaded, body) = await asyncio.gather(
            asyncio.gather(*deletes), upload(client, b"backup")
        )
        elapsed = time.monotonic() - started
    assert [r.status for r in answers] == [503] * 4
    assert {(await r.json())["message"] for r in answers} == {"directory unavailable"}
    assert (uploaded.status, body["message"]) == (503, "directory unavailable")
    # within the wait for a query (2 x (0.5 + 1) s), not the lock's: a loaded machine's margin
    assert elapsed < 3.0 + 5, elapsed
    assert all(local_harness.exists(location_for(o, b)) for o, b in backups.items())
    assert backups_of(local_harness) == [backups["org_c1"]]  # and nothing uploaded


async def test_concurrent_cold_lookups_ride_one_query_and_each_gets_its_own_answer(
    start_gateway: StartGateway, local_harness: LocalHarness, platform_db: PlatformDatabase
) -> None:
    # Every live system at once, nothing cached, a pool of four: the first lookup goes out
    # at once, alone (nothing was in flight); all the others ride in one more query (the
    # pool is not a queue of one lookup per connection); each request is answered for its
    # own system.
    client = await pg_gateway(
        start_gateway, local_harness, platform_db, cache_seconds=0, pool_size=4
    )
    live = [o["id"] for o in ORGANIZATIONS if not o.get("deleted") and o["role"] != "owner"]
    backups = {org: new_backup_id() for org in live}
    for org, bid in backups.items():
        local_harness.put(location_for(org, bid))
    async with platform_db.locked("systems"):
        answers = asyncio.gather(
            *(
                client.delete(
                    f"/api/systems/{system_id_of(org)}/backups/{bid}",
                    headers=bearer(token_for("org_owner")),
                )
                for org, bid in backups.items()
            )
        )
        assert await _waiting_queries_once_asked(client, platform_db, len(backups)) == 2
        await asyncio.sleep(0.3)  # the fault: the lock held on, which the timings must count
    statuses = [r.status for r in await answers]
    assert statuses == [200] * len(backups)
    # and the database ran those two queries, no more
    assert (await platform_db.statement_counts(" WHERE id = ANY($1::text[])"))[1] == 2
    assert not any(local_harness.exists(location_for(o, b)) for o, b in backups.items())
    # each request's lookup is counted and timed (the wait for the lock included)
    metrics = await (await client.get("/metrics")).text()
    n = len(backups)
    assert f'gateway_directory_lookups_total{{lookup="system",outcome="found"}} {n}.0' in metrics
    assert f'gateway_directory_lookup_duration_seconds_count{{lookup="system"}} {n}.0' in metrics
    assert '_duration_seconds_bucket{le="0.25",lookup="system"} 0.0' in metrics


async def test_a_distributors_cold_request_asks_the_database_in_one_round_trip(
    start_gateway: StartGateway, local_harness: LocalHarness, platform_db: PlatformDatabase
) -> None:
    # A distributor on its reseller's customer needs four answers: the system, the system's
    # organization, the reseller between, and its own organization. All four come in one
    # query (it waits on the locks alone), and nothing more is asked after it.
    client = await pg_gateway(start_gateway, local_harness, platform_db, cache_seconds=0)
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    async with platform_db.locked("systems, distributors"):
        answer = asyncio.ensure_future(delete_as(client, bid, "sys_c1", "org_d1"))
        assert await _waiting_queries_once_asked(client, platform_db, 1) == 1
    resp = await answer
    assert resp.status == 200, await resp.text()
    assert not local_harness.exists(location_for("org_c1", bid))
    metrics = await (await client.get("/metrics")).text()
    asked = re.findall(
        r'gateway_directory_lookups_total\{lookup="(\w+)",outcome="(\w+)"\} (\S+)', metrics
    )
    lookups = sorted(a for a in asked if a[0] != "case_scan")  # the scan is not a lookup
    assert lookups == [("system_in_tree_and_organization", "found", "1.0")]


@pytest.mark.parametrize(
    ("duplicate", "table", "parent", "caller"),
    [
        ("org_c1", "resellers", "org_d1", "org_r1"),  # the system's own organization
        ("org_r1", "customers", "org_d1", "org_d1"),  # the creator a distributor reaches it by
        ("org_d1", "resellers", "org_owner", "org_d1"),  # the caller's own, asked beside them
    ],
)
async def test_an_organization_live_in_two_tables_is_refused(
    start_gateway: StartGateway,
    local_harness: LocalHarness,
    platform_db: PlatformDatabase,
    caplog: pytest.LogCaptureFixture,
    duplicate: str,
    table: str,
    parent: str,
    caller: str,
) -> None:
    # A data error of the platform's (its unique indexes are per table): which role is
    # meant cannot be told, so nothing is reached through that organization.
    await platform_db.execute(
        f"INSERT INTO {table} (id, logto_id, name, custom_data)"  # noqa: S608 (a test's table)
        " VALUES ('dup', $1, 'dup', jsonb_build_object('createdBy', $2::text))",
        duplicate,
        parent,
    )
    client = await pg_gateway(start_gateway, local_harness, platform_db, cache_seconds=0)
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    with caplog.at_level(logging.ERROR):
        resp = await delete_as(client, bid, "sys_c1", caller)
    assert (resp.status, (await resp.json())["message"]) == (403, "access denied to system")
    assert local_harness.exists(location_for("org_c1", bid))
    assert f"organization {duplicate} refused: live in 2 organization tables" in caplog.text


class _OrganizationsUnavailable(InMemoryDirectory):
    """The test directory, whose organizations cannot answer now: a state no lock on the
    platform's tables makes (for a caller other than the Owner the system's own query reads
    the organization tables too), so the cache's order of answers is tested over this."""

    async def organization(self, organization_id: str) -> Organization | None:
        raise DirectoryUnavailable("organizations unavailable")


@pytest.mark.parametrize("caller", ["org_owner", "org_d1"])
async def test_a_missing_system_is_404_while_the_callers_organization_cannot_answer(
    aiohttp_client: Any, tmp_path: Path, local_harness: LocalHarness, caller: str
) -> None:
    # The caller's organization is asked beside the system, but only a found system waits
    # for its answer: "system not found" stays a 404, not the other lookup's 503.
    test_directory = parse_directory(DIRECTORY)
    inner = _OrganizationsUnavailable(test_directory.organizations, test_directory.systems)
    app = create_app(
        make_config(tmp_path, local_harness.storage()), directory=CachedDirectory(inner, 0)
    )
    client = await aiohttp_client(app)
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    missing = await delete_as(client, bid, "sys_nowhere", caller)
    assert (missing.status, await missing.json()) == (
        404,
        {"code": 404, "message": "system not found", "data": {}},
    )
    found = await delete_as(client, bid, "sys_c1", caller)
    assert (found.status, (await found.json())["message"]) == (503, "directory unavailable")
    assert local_harness.exists(location_for("org_c1", bid))


# Other tenants beside the test directory, enough that a table scan costs the planner more
# than an index probe: a platform's shape, at a test's size.
_OTHER_TENANTS = [
    """INSERT INTO distributors (id, logto_id, name, custom_data)
       SELECT 'pad-d' || g, 'pad_d' || g, 'd', '{"createdBy": "org_owner"}'
         FROM generate_series(1, 500) g""",
    """INSERT INTO resellers (id, logto_id, name, custom_data)
       SELECT 'pad-r' || g, 'pad_r' || g, 'r', jsonb_build_object('createdBy', 'pad_d' || g % 500)
         FROM generate_series(1, 5000) g""",
    """INSERT INTO customers (id, logto_id, name, custom_data)
       SELECT 'pad-c' || g, 'pad_c' || g, 'c', jsonb_build_object('createdBy', 'pad_r' || g % 5000)
         FROM generate_series(1, 20000) g""",
    """INSERT INTO systems (id, name, organization_id, system_key, registered_at)
       SELECT 'pad-s' || g, 's', 'pad_c' || g % 20000, 'PAD-' || g, now()
         FROM generate_series(1, 50000) g""",
    "ANALYZE",
]


@pytest.mark.parametrize(
    ("query", "arguments"),
    [
        (postgres_queries._SYSTEMS_BY_ID, ["pad-s17"]),
        (postgres_queries._SYSTEMS_BY_KEY, ["PAD-17"]),
        (postgres_queries._ORGANIZATIONS, ["pad_c17"]),
        (postgres_queries._SYSTEMS_IN_TREE, ["pad-s17"]),
        (postgres_queries._SYSTEMS_IN_TREE_AND_CALLERS, ["pad-s17", "pad_d3"]),
    ],
    ids=[
        "systems by id",
        "systems by key",
        "organizations",
        "systems in their tree",
        "systems in their tree beside their callers",
    ],
)
async def test_every_lookup_is_answered_from_the_platforms_indexes(
    platform_db: PlatformDatabase, query: str, arguments: list[str]
) -> None:
    # A lookup that scanned a table would cost a platform's size on every cold request:
    # each query's generic plan (the one the gateway's connections run) probes indexes only.
    for statement in _OTHER_TENANTS:
        await platform_db.execute(statement)
    plan = await platform_db.generic_plan(query, *arguments)
    assert "Seq Scan" not in plan, plan
    assert "Index" in plan, plan


async def test_each_connection_plans_a_lookup_query_once(
    start_gateway: StartGateway, local_harness: LocalHarness, platform_db: PlatformDatabase
) -> None:
    """Left to itself, the server plans an array-parameter query anew on every execution
    (a plan for one element looks cheaper than the generic one): most of a cold lookup's
    time in the server. The gateway's connections settle on the generic plan (the one the
    test above holds to the indexes): planned once per connection, whatever the load."""
    for statement in _OTHER_TENANTS:
        await platform_db.execute(statement)
    client = await pg_gateway(start_gateway, local_harness, platform_db, cache_seconds=0)
    asked = [("sys_c1", "org_owner"), ("sys_c2", "org_owner")] + [
        (system, "org_d1") for system in ("sys_c1", "sys_c1b", "sys_c_d1", "sys_r1")
    ]
    for _ in range(5):
        for system, caller in asked:
            resp = await delete_as(client, new_backup_id(), system, caller)
            assert resp.status == 404, await resp.text()
            assert (await resp.json())["message"] == "backup not found"
    pool_size = 4  # the default: at most one plan per connection and query
    # each query by a line of its own (pg_stat_statements shows constants as $n)
    for query, line in (
        (postgres_queries._SYSTEMS_BY_ID, " WHERE id = ANY($1::text[])"),  # the Owner's
        (postgres_queries._SYSTEMS_IN_TREE_AND_CALLERS, "FROM unnest($1::text[], $2::text[])"),
    ):
        assert line in query
        plans, calls = await platform_db.statement_counts(line)
        assert calls >= 10, (calls, line)
        assert 1 <= plans <= pool_size, (plans, calls, line)


async def _waiting_queries_once_asked(
    client: TestClient, database: PlatformDatabase, requests: int
) -> int:
    """The gateway's queries waiting on a lock, once all `requests` are being handled (its
    in-flight gauge, which counts the scrape's own request too) and one query waits."""
    await eventually(
        lambda: scraped_is(client, "gateway_http_requests_in_flight", requests + 1),
        f"{requests} requests in the gateway",
    )
    await eventually(lambda: _waiting_queries(database), "a lookup waiting on the lock")
    return await _waiting_queries(database)


async def _waiting_queries(database: PlatformDatabase) -> int:
    return int(
        await database.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
            " AND application_name = 'backup-gateway' AND wait_event_type = 'Lock'",
            database.name,
        )
    )


@pytest.mark.parametrize("cache_seconds", [0, 5])
async def test_a_lookup_whose_caller_goes_away_still_answers_the_others(
    platform_db: PlatformDatabase, cache_seconds: float
) -> None:
    # The directory as the gateway builds it (cache over PostgreSQL), against the real
    # server: the first asker of a key is cancelled while its query waits on a lock; the
    # others waiting for that key, and for another key in the same query, get their answers.
    config = PostgresDirectoryConfig(
        dsn=platform_db.dsn, owner_organization_id="org_owner", cache_seconds=cache_seconds
    )
    directory = CachedDirectory(PostgresDirectory(config), cache_seconds)
    await directory.start()
    try:
        await directory.check_ready()  # its first case scan has answered
        async with platform_db.locked("systems"):
            first = asyncio.ensure_future(directory.system("sys_c1"))
            again = asyncio.ensure_future(directory.system("sys_c1"))
            other = asyncio.ensure_future(directory.system("sys_c2"))
            await eventually(lambda: _waiting_queries(platform_db), "a query on the lock")
            first.cancel()
            await asyncio.wait([first])  # gone while the query still waits
        answers = await asyncio.wait_for(asyncio.gather(again, other), 5)
        assert [(s.id, s.organization_id) for s in answers if s is not None] == [
            ("sys_c1", "org_c1"),
            ("sys_c2", "org_c2"),
        ]
        assert first.cancelled()
        found = await directory.system("sys_c1")
        assert found is not None and found.id == "sys_c1"
    finally:
        await directory.close()


async def test_a_database_that_goes_away_is_503_and_unready_then_recovers(
    start_gateway: StartGateway,
    local_harness: LocalHarness,
    platform_db: PlatformDatabase,
    postgres_server: PostgresServer,
) -> None:
    relay = TcpRelay(postgres_server.port)
    await relay.start()
    dsn = platform_db.dsn.replace(f":{postgres_server.port}/", f":{relay.port}/")
    client = await start_gateway(
        local_harness.storage(),
        directory={
            "kind": "postgres",
            "postgres": {"dsn": dsn, "owner_organization_id": "org_owner", "cache_seconds": 0},
        },
    )
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    try:
        assert (await client.get("/readyz")).status == 200
        await relay.stop()
        started = time.monotonic()
        resp = await delete_as(client, bid)
        assert resp.status == 503
        assert (await resp.json())["message"] == "directory unavailable"
        assert time.monotonic() - started < 4.0
        ready = await client.get("/readyz")
        assert ready.status == 503
        assert (await ready.json())["data"]["checks"] == {
            "directory": "unavailable",
            "storage": "ok",
        }
        assert local_harness.exists(location_for("org_c1", bid))
        await relay.start()
        assert (await client.get("/readyz")).status == 200
        assert (await delete_as(client, bid)).status == 200
    finally:
        await relay.stop()


async def test_a_database_down_at_start_up_does_not_stop_the_gateway(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    dsn = f"postgresql://gateway_ro@127.0.0.1:{free_port()}/platform"
    client = await start_gateway(
        local_harness.storage(),
        directory={"kind": "postgres", "postgres": {"dsn": dsn, "owner_organization_id": "o"}},
    )
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 503
    assert (await delete_as(client, new_backup_id())).status == 503


# --------------------------------------------------------------------------- file reload


def write_directory(path: Path, directory: dict[str, Any]) -> None:
    """Write the way an operator's tool should: a new file renamed into place."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(yaml.safe_dump(directory))
    os.replace(tmp, path)


def with_org_deleted(org_id: str) -> dict[str, Any]:
    organizations = [
        {**o, "deleted": True} if o["id"] == org_id else o for o in DIRECTORY["organizations"]
    ]
    return {"organizations": organizations, "systems": DIRECTORY["systems"]}


async def test_file_directory_changes_take_effect_within_reload_seconds(
    start_gateway: StartGateway, local_harness: LocalHarness, directory_file: Path
) -> None:
    client = await start_gateway(local_harness.storage(), directory={"reload_seconds": 0.2})
    write_directory(directory_file, with_org_deleted("org_c1"))
    changed = time.monotonic()
    # reload_seconds is 0.2 s; the bound is a loaded machine's
    await until_refused(
        lambda bid: delete_as(client, bid, "sys_c1", "org_r1"),
        local_harness,
        refused=403,
        stale_from=changed + 0.2 + 5,
    )


async def test_a_broken_file_keeps_the_last_good_directory(
    start_gateway: StartGateway,
    local_harness: LocalHarness,
    directory_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await start_gateway(local_harness.storage(), directory={"reload_seconds": 0.1})
    directory = client.app[DIRECTORY_KEY]
    assert isinstance(directory, FileDirectory)

    async def refused_by_several_rounds(failures: int) -> None:
        await eventually(lambda: directory.reload_failures == failures, f"bad version {failures}")
        for _ in range(3):  # more reload rounds see the same bad version
            assert not await directory.check_for_change()

    broken = with_org_deleted("org_c1")
    broken["systems"] = [*broken["systems"], {"id": "sys_bad", "organization_id": "org_nowhere"}]
    with caplog.at_level("ERROR", logger="gateway.directory.file"):
        write_directory(directory_file, broken)
        await refused_by_several_rounds(1)
        new = directory_file.with_name("broken.new")  # renamed in: never seen half-written
        new.write_text("organizations: [\n  - {id: x")  # a YAML error, line 2
        os.replace(new, directory_file)
        await refused_by_several_rounds(2)
        directory_file.unlink()
        await refused_by_several_rounds(3)
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.directory.file"]
    assert len(lines) == 3, lines  # one line per bad version
    assert "system sys_bad: organization 'org_nowhere' is not defined" in lines[0]
    assert "not valid YAML at line" in lines[1]
    assert "has gone missing" in lines[2]
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    assert (await delete_as(client, bid, "sys_c1", "org_r1")).status == 200  # last good one
    metrics = await (await client.get("/metrics")).text()
    assert "gateway_directory_reload_failures_total 3.0" in metrics


def test_sighup_reloads_the_file_at_once(tmp_path: Path) -> None:
    port = free_port()
    harness = LocalHarness(tmp_path / "backups")
    config = write_config(tmp_path, port, harness.storage(), directory={"reload_seconds": 3600})
    proc = serve_gateway(config)
    output = OutputWatcher(proc)
    try:
        wait_for_port(port, proc=proc)
        first = new_backup_id()
        harness.put(location_for("org_c1", first))

        url = f"http://127.0.0.1:{port}/api/systems/sys_c1/backups/"
        assert http("DELETE", url + first, token_for("org_r1"))[0] == 200
        write_directory(tmp_path / "directory.yaml", with_org_deleted("org_c1"))
        proc.send_signal(signal.SIGHUP)
        output.wait_for(lambda rs: any(r["msg"] == "directory reloaded" for r in rs))
        second = new_backup_id()
        harness.put(location_for("org_c1", second))
        assert http("DELETE", url + second, token_for("org_r1"))[0] == 403
        assert harness.exists(location_for("org_c1", second))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    out = output.wait_closed()
    assert proc.returncode == 0, out


# --------------------------------------------------------------------------- Redis: revocation


def revocation_sections(redis_server: RedisServer, **settings: Any) -> dict[str, Any]:
    return {
        "redis": {"url": redis_server.url},
        "auth": {"revocation": {"enabled": True, "cache_seconds": 0.5, **settings}},
    }


async def test_a_revoked_token_is_401_within_cache_seconds_even_when_cached(
    start_gateway: StartGateway, local_harness: LocalHarness, redis_server: RedisServer
) -> None:
    client = await start_gateway(local_harness.storage(), **revocation_sections(redis_server))
    token = token_for("org_c1")
    first = new_backup_id()
    local_harness.put(location_for("org_c1", first))
    headers = bearer(token)
    assert (
        await client.delete(f"/api/systems/sys_c1/backups/{first}", headers=headers)
    ).status == 200
    cached_by = time.monotonic()  # "not revoked" was asked before this, held for 0.5 s
    key = "jwt_blacklist:" + hashlib.sha256(token.encode()).hexdigest()
    redis_server.client(0).set(key, "1", ex=600)
    resp = await until_refused(
        lambda bid: client.delete(f"/api/systems/sys_c1/backups/{bid}", headers=headers),
        local_harness,
        refused=401,
        stale_from=cached_by + 0.5,
    )
    assert await resp.json() == {"code": 401, "message": "token has been revoked", "data": {}}
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_requests_with_one_token_share_one_revocation_lookup(
    start_gateway: StartGateway, local_harness: LocalHarness, redis_server: RedisServer
) -> None:
    # Were each request to ask for itself, every request in flight when the answer ages
    # out would ask Redis the same question (at 3,000 req/s: 64 lookups each second, each
    # waiting on the others for the client's connections).
    client = await start_gateway(
        local_harness.storage(), **revocation_sections(redis_server, cache_seconds=5)
    )
    headers = bearer(token_for("org_c1"))
    backups = [new_backup_id() for _ in range(20)]
    for bid in backups:
        local_harness.put(location_for("org_c1", bid))
    admin = redis_server.client(0)
    admin.config_resetstat()
    admin.execute_command("CLIENT", "PAUSE", "300", "ALL")  # all 20 arrive before the answer
    answers = await asyncio.gather(
        *(client.delete(f"/api/systems/sys_c1/backups/{bid}", headers=headers) for bid in backups)
    )
    assert [r.status for r in answers] == [200] * len(backups)
    assert not any(local_harness.exists(location_for("org_c1", bid)) for bid in backups)
    assert admin.info("commandstats")["cmdstat_exists"]["calls"] == 1


@pytest.mark.parametrize("which", ["id", "logto_id"])
async def test_every_token_of_a_revoked_user_is_401(
    start_gateway: StartGateway, local_harness: LocalHarness, redis_server: RedisServer, which: str
) -> None:
    client = await start_gateway(local_harness.storage(), **revocation_sections(redis_server))
    claims = claims_for("org_c1")
    claims["user"].update({"id": "u_rev_" + which, "logto_id": "logto_rev_" + which})
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    redis_server.client(0).set(f"jwt_user_blacklist:{claims['user'][which]}", "1", ex=600)
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    resp = await client.delete(f"/api/systems/sys_c1/backups/{bid}", headers=bearer(token))
    assert resp.status == 401
    assert (await resp.json())["message"] == "token has been revoked"
    assert local_harness.exists(location_for("org_c1", bid))


@pytest.mark.parametrize(("on_error", "status"), [("deny", 503), ("allow", 200)])
async def test_redis_down_denies_or_allows_as_configured(
    start_gateway: StartGateway, local_harness: LocalHarness, on_error: str, status: int
) -> None:
    client = await start_gateway(
        local_harness.storage(),
        redis={"url": f"redis://127.0.0.1:{free_port()}"},
        auth={"revocation": {"enabled": True, "on_error": on_error}},
    )
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    started = time.monotonic()
    resp = await delete_as(client, bid)
    assert time.monotonic() - started < 1 + 5  # one lookup's bound (1 s), not a hang
    assert resp.status == status
    if status == 503:
        assert (await resp.json())["message"] == "security service unavailable"
        assert resp.headers["Retry-After"] == "1"
    assert local_harness.exists(location_for("org_c1", bid)) == (status != 200)
    ready = await client.get("/readyz")
    assert (await ready.json())["data"]["checks"]["redis"] == "unavailable"


# --------------------------------------------------------------------------- Redis: usage


async def test_a_delete_drops_the_organizations_usage_counter(
    start_gateway: StartGateway, local_harness: LocalHarness, redis_server: RedisServer
) -> None:
    client = await start_gateway(
        local_harness.storage() | {"usage_counter": {"enabled": True}},
        redis={"url": redis_server.url},
    )
    usage = redis_server.client(1)
    usage.set("backup:org_usage:org_c1", "123456")
    usage.set("backup:org_usage:org_c2", "999")
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    assert (await delete_as(client, bid)).status == 200
    # dropped (after the answer), not decremented
    await eventually(lambda: not usage.exists("backup:org_usage:org_c1"), "org_c1's drop")
    assert usage.get("backup:org_usage:org_c2") == b"999"
    # a refused delete changes nothing: a later delete's drop, once seen, shows that the
    # refused one's would have happened by then
    usage.set("backup:org_usage:org_c1", "5")
    assert (await delete_as(client, new_backup_id())).status == 404
    later = new_backup_id()
    local_harness.put(location_for("org_c2", later))
    assert (await delete_as(client, later, "sys_c2", "org_c2")).status == 200
    await eventually(lambda: not usage.exists("backup:org_usage:org_c2"), "org_c2's drop")
    assert usage.get("backup:org_usage:org_c1") == b"5"
    assert redis_server.client(0).get("backup:org_usage:org_c1") is None  # DB 1 only


async def test_usage_counter_failure_never_changes_the_answer(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    storage = local_harness.storage() | {"usage_counter": {"enabled": True}}
    client = await start_gateway(storage, redis={"url": f"redis://127.0.0.1:{free_port()}"})
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    assert (await delete_as(client, bid)).status == 200
    assert not local_harness.exists(location_for("org_c1", bid))
    failures = "gateway_usage_counter_failures_total"
    await eventually(lambda: scraped_is(client, failures, 1), "the drop's failure counted")
    metrics = await (await client.get("/metrics")).text()
    assert re.search(r"^gateway_usage_counter_failures_total 1\.0$", metrics, re.M), metrics


# --------------------------------------------------------------------------- tokens


def platform_token(**user: Any) -> str:
    """As the platform signs them: HS256 over the raw secret, capitalized role, aud a list."""
    claims = claims_for("org_c1")
    claims["aud"] = ["https://platform.example/api"]
    claims["iss"] = "platform.example"
    claims["user"].update(user)
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def test_platform_tokens_verify(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    client = await start_gateway(
        local_harness.storage(),
        auth={"issuer": "platform.example", "audience": "https://platform.example/api"},
    )
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    resp = await client.delete(
        f"/api/systems/sys_c1/backups/{bid}", headers=bearer(platform_token(org_role="Customer"))
    )
    assert resp.status == 200


async def test_owner_organization_tokens_have_no_user_id_and_no_sub(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    claims = claims_for("org_owner")
    del claims["sub"]
    claims["user"]["id"] = ""
    bid = new_backup_id()
    local_harness.put(location_for("org_c2", bid))
    resp = await local_gateway.delete(
        f"/api/systems/sys_c2/backups/{bid}",
        headers=bearer(jwt.encode(claims, SECRET, algorithm="HS256")),
    )
    assert resp.status == 200
    assert not local_harness.exists(location_for("org_c2", bid))


@pytest.mark.parametrize(
    "credential",
    [
        jwt.encode(claims_for("org_c1", token_type="impersonation"), SECRET, algorithm="HS256"),
        "myk_" + "a" * 40,
        "myo_" + "b" * 40,
    ],
    ids=["impersonation", "myk api key", "myo api key"],
)
async def test_impersonation_tokens_and_api_keys_are_401(
    local_gateway: TestClient, local_harness: LocalHarness, credential: str
) -> None:
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    resp = await local_gateway.delete(
        f"/api/systems/sys_c1/backups/{bid}", headers=bearer(credential)
    )
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert local_harness.exists(location_for("org_c1", bid))
