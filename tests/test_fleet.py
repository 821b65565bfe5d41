"""The fleet (DESIGN.md §13): who stopped backing up, over both directories and real
storage — each caller's reach as the hierarchy's rules give it, fresh / stale / never at
their boundaries, an upload seen without a rescan, pages that hold every system once."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from jose import jwt

from gateway.backups.fleet import encoded_cursor
from gateway.directory import postgres as postgres_queries
from storage_backends.ids import new_uuid7

from .conftest import StartGateway, postgres_directory
from .servers import PlatformDatabase
from .support import (
    ORG_IDS,
    SECRET,
    SYSTEMS,
    LocalHarness,
    bearer,
    claims_for,
    eventually,
    location_for,
    scrape,
    system_id_of,
    token_for,
)
from .test_hierarchy import ALLOWED
from .test_platform import _OTHER_TENANTS
from .test_uploads import upload

HOUR_MS = 3600 * 1000
STALE_MS = 36 * HOUR_MS  # fleet.stale_after_hours' default
SERVED = {s["id"] for s in SYSTEMS if s.get("system_key") and not s.get("deleted")}


def backup_id_at(unix_ms: int) -> str:
    return new_uuid7(unix_ms) + ".tar.gz"


def now_ms() -> int:
    return int(time.time() * 1000)


async def fleet(
    client: TestClient, caller: str = "org_owner", **query: Any
) -> tuple[int, dict[str, Any]]:
    resp = await client.get(
        "/api/backups/fleet",
        params={k: str(v) for k, v in query.items()},
        headers=bearer(token_for(caller)),
    )
    return resp.status, await resp.json()


async def ready(client: TestClient) -> None:
    async def answered() -> bool:
        return (await fleet(client))[0] == 200

    await eventually(answered, "the first scan")


async def every_page(client: TestClient, caller: str, **query: Any) -> list[dict[str, Any]]:
    systems: list[dict[str, Any]] = []
    cursor = None
    while True:
        asked = dict(query, **({"cursor": cursor} if cursor else {}))
        status, body = await fleet(client, caller, **asked)
        assert status == 200, body
        systems += body["data"]["systems"]
        cursor = body["data"]["next_cursor"]
        if cursor is None:
            return systems


@pytest.fixture
async def fleet_gateway(
    start_gateway: StartGateway, local_harness: LocalHarness, directory_section: dict[str, Any]
) -> TestClient:
    return await start_gateway(local_harness.storage(), directory=directory_section)


async def test_every_callers_reach_is_the_hierarchys(
    start_gateway: StartGateway, local_harness: LocalHarness, directory_section: dict[str, Any]
) -> None:
    """Over each directory: the systems each caller is shown are exactly the live,
    registered systems of the organizations the hierarchy lets it act on."""
    for org in ORG_IDS[::3]:
        local_harness.put(location_for(org, backup_id_at(now_ms() - HOUR_MS)))
    fleet_gateway = await start_gateway(local_harness.storage(), directory=directory_section)
    await ready(fleet_gateway)
    for caller in ORG_IDS:
        systems = await every_page(fleet_gateway, caller, limit=4)
        expected = {system_id_of(org) for org in ALLOWED[caller]} & SERVED
        ids = [s["system_id"] for s in systems]
        assert ids == sorted(expected), caller  # each once, in a stable order
        for item in systems:
            backed_up = item["organization_id"] in ORG_IDS[::3]
            assert item["state"] == ("fresh" if backed_up else "never"), (caller, item)
            assert item["backups"] == (1 if backed_up else 0)


async def test_fresh_stale_and_never_at_their_boundaries(
    start_gateway: StartGateway, local_harness: LocalHarness, directory_section: dict[str, Any]
) -> None:
    # a minute either side of fleet.stale_after_hours; a test takes less than that
    local_harness.put(location_for("org_c1", backup_id_at(now_ms() - STALE_MS + 60_000)), b"ab")
    local_harness.put(location_for("org_c1b", backup_id_at(now_ms() - STALE_MS - 60_000)), b"abc")
    fleet_gateway = await start_gateway(local_harness.storage(), directory=directory_section)
    await ready(fleet_gateway)
    status, body = await fleet(fleet_gateway, "org_r1")
    assert status == 200
    shown = {s["system_id"]: s for s in body["data"]["systems"]}
    assert (shown["sys_c1"]["state"], shown["sys_c1"]["bytes"]) == ("fresh", 2)
    assert (shown["sys_c1b"]["state"], shown["sys_c1b"]["bytes"]) == ("stale", 3)
    assert (shown["sys_r1"]["state"], shown["sys_r1"]["newest_backup_at"]) == ("never", None)
    assert body["data"]["counts"] == {"fresh": 1, "stale": 1, "never": 1}
    assert body["data"]["scanned_at"].endswith("Z")
    for state in ("fresh", "stale", "never"):
        status, body = await fleet(fleet_gateway, "org_r1", state=state)
        assert [s["state"] for s in body["data"]["systems"]] == [state]
        assert body["data"]["counts"] == {"fresh": 1, "stale": 1, "never": 1}


async def test_an_upload_turns_a_stale_system_fresh_without_a_rescan(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    old = backup_id_at(now_ms() - 3 * STALE_MS)
    local_harness.put(location_for("org_c1", old), b"old")
    client = await start_gateway(local_harness.storage(), fleet={"scan_seconds": 3600})
    await ready(client)
    _, body = await fleet(client, "org_c1")
    assert [(s["state"], s["backups"]) for s in body["data"]["systems"]] == [("stale", 1)]
    resp, answer = await upload(client, b"fresh bytes")
    assert resp.status == 201, answer
    _, body = await fleet(client, "org_c1")
    [item] = body["data"]["systems"]
    assert (item["state"], item["backups"], item["bytes"]) == ("fresh", 2, 3 + 11)
    # a delete is seen at once too
    resp = await client.delete(
        f"/api/systems/sys_c1/backups/{old}", headers=bearer(token_for("org_c1"))
    )
    assert resp.status == 200
    _, body = await fleet(client, "org_c1")
    [item] = body["data"]["systems"]
    assert (item["state"], item["backups"], item["bytes"]) == ("fresh", 1, 11)


async def test_pages_hold_every_system_once_while_uploads_go_on(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    client = await start_gateway(local_harness.storage(), fleet={"scan_seconds": 0.05})
    await ready(client)
    stop = asyncio.Event()

    async def keep_uploading() -> None:
        while not stop.is_set():
            resp, _ = await upload(client, b"x" * 100)
            assert resp.status in (201, 429)
            await asyncio.sleep(0)

    uploading = asyncio.ensure_future(keep_uploading())
    try:
        for limit in (1, 2, 5):
            systems = await every_page(client, "org_owner", limit=limit)
            ids = [s["system_id"] for s in systems]
            assert ids == sorted(SERVED), limit
    finally:
        stop.set()
        await uploading


@pytest.mark.parametrize(
    ("query", "key"),
    [
        ({"state": "old"}, "state"),
        ({"limit": "0"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "Zm9v"}, "cursor"),  # base64 of "foo": no cursor of ours
        ({"cursor": encoded_cursor("")}, "cursor"),  # no id
        ({"cursor": "ZmxlZXQ6_w"}, "cursor"),  # "fleet:" and a byte that is no UTF-8
    ],
)
async def test_a_bad_query_is_a_400_naming_its_key(
    fleet_gateway: TestClient, query: dict[str, str], key: str
) -> None:
    status, body = await fleet(fleet_gateway, **query)
    assert status == 400
    assert body["message"] == "validation failed"
    assert [e["key"] for e in body["data"]["errors"]] == [key]


async def test_a_limit_above_1000_is_taken_as_1000(fleet_gateway: TestClient) -> None:
    await ready(fleet_gateway)
    status, body = await fleet(fleet_gateway, limit="1" + "0" * 30)
    assert status == 200
    assert len(body["data"]["systems"]) == len(SERVED)
    assert body["data"]["next_cursor"] is None


async def test_the_fleet_needs_read_systems(fleet_gateway: TestClient) -> None:
    claims = claims_for("org_owner", permissions=["manage:systems"])
    claims["user"]["user_permissions"] = []
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    for route in ("fleet", "orphans"):
        resp = await fleet_gateway.get(f"/api/backups/{route}", headers=bearer(token))
        assert (resp.status, (await resp.json())["message"]) == (403, "insufficient permissions")


async def test_before_the_first_scan_the_fleet_is_503(
    start_gateway: StartGateway, tmp_path: Any
) -> None:
    # a root that is not marked (an unmounted volume): no scan ever ends
    (tmp_path / "unmarked").mkdir()
    client = await start_gateway(
        {"backend": "local", "local": {"root": str(tmp_path / "unmarked")}},
        fleet={"scan_seconds": 0.05},
    )
    await eventually(lambda: _scans_failed(client), "a failed scan")
    status, body = await fleet(client)
    assert (status, body["message"], body["data"]) == (503, "fleet index not ready", {})
    owner = bearer(token_for("org_owner"))
    resp = await client.get("/api/backups/orphans", headers=owner)
    assert (resp.status, (await resp.json())["message"]) == (503, "fleet index not ready")


async def _scans_failed(client: TestClient) -> bool:
    return await scrape(client, 'gateway_fleet_scans_total{outcome="failed"}') >= 1


async def test_metrics_count_the_owners_reach_by_state(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    local_harness.put(location_for("org_c1", backup_id_at(now_ms() - HOUR_MS)))
    local_harness.put(location_for("org_c2", backup_id_at(now_ms() - 2 * STALE_MS)))
    local_harness.put(location_for("org_c2", backup_id_at(now_ms() - 3 * STALE_MS)), b"abcd")
    client = await start_gateway(local_harness.storage())
    await ready(client)
    assert await scrape(client, 'gateway_fleet_systems{state="fresh"}') == 1
    assert await scrape(client, 'gateway_fleet_systems{state="stale"}') == 1
    assert await scrape(client, 'gateway_fleet_systems{state="never"}') == len(SERVED) - 2
    assert await scrape(client, "gateway_fleet_orphaned_bytes") == 0
    assert 0 <= await scrape(client, "gateway_fleet_scan_age_seconds") < 60


RULES = Path(__file__).resolve().parent.parent / "deploy/prometheus/backup-gateway.rules.yml"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_the_alert_rules_are_valid_and_name_the_fleets_metrics() -> None:
    checked = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = RULES.read_text()
    for metric in (
        'gateway_fleet_systems{state="stale"}',
        "gateway_fleet_scan_age_seconds",
        "gateway_fleet_orphaned_bytes",
    ):
        assert metric in rules


async def _generic_plan(database: PlatformDatabase, query: str, types: str, args: str) -> str:
    """EXPLAIN of `query`'s generic plan (what the gateway's connections run)."""
    connection = await asyncpg.connect(database.server.dsn(database.name, "postgres"))
    try:
        await connection.execute("SET plan_cache_mode = force_generic_plan")
        await connection.execute(f"PREPARE asked({types}) AS {query}")
        rows = await connection.fetch(f"EXPLAIN (COSTS OFF) EXECUTE asked({args})")
        return "\n".join(row[0] for row in rows)
    finally:
        await connection.close()


@pytest.mark.parametrize(
    ("query", "types", "args"),
    [
        (postgres_queries._REACH, "text, text", "'pad_d3', 'distributor'"),
        (postgres_queries._REACH, "text, text", "'pad_r3', 'reseller'"),
        (postgres_queries._MAPS_FOLDER, "text, text", "'PAD-17', 'pad_c17'"),
    ],
    ids=["a distributor's reach", "a reseller's reach", "whether a folder is mapped"],
)
async def test_the_fleets_queries_find_systems_by_the_platforms_indexes(
    platform_db: PlatformDatabase, query: str, types: str, args: str
) -> None:
    """A reach's systems come from the index on systems.organization_id, never a scan of
    the systems table (a platform's largest); organizations are checked by the unique
    indexes on logto_id. (The platform keeps no index on createdBy: resellers and
    customers are read once per query.)"""
    for statement in _OTHER_TENANTS:
        await platform_db.execute(statement)
    plan = await _generic_plan(platform_db, query, types, args)
    assert "Seq Scan on systems" not in plan, plan
    assert "Seq Scan on distributors" not in plan, plan
    assert "Index" in plan, plan


async def test_pages_reach_systems_whose_platform_ids_are_no_safe_names(
    start_gateway: StartGateway, local_harness: LocalHarness, platform_db: PlatformDatabase
) -> None:
    """The platform's system ids are not held to the folders' safe names: a page that ends
    on such a system hands out a cursor the next request takes (it failed 400 once, and
    every system after it could not be reached)."""
    odd = ["sys_c1 weird:id", "sys_c1\u00e9", "sys_c1" + "z" * 2000, "sys_c1/..", "sys_\u2603"]
    for n, system_id in enumerate(odd):
        await platform_db.execute(
            "INSERT INTO systems (id, name, organization_id, system_key, registered_at)"
            " VALUES ($1, 'odd', 'org_c1', $2, now())",
            system_id,
            f"KEY-ODD{n}",
        )
    client = await start_gateway(local_harness.storage(), directory=postgres_directory(platform_db))
    await ready(client)
    whole = [s["system_id"] for s in await every_page(client, "org_c1", limit=1000)]
    assert set(odd) <= set(whole)
    paged = [s["system_id"] for s in await every_page(client, "org_c1", limit=1)]
    assert paged == whole == sorted(whole)  # code-point order, each once
