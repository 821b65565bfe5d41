"""One behaviour suite, run against every real backend (local disk and an S3 server)."""

from __future__ import annotations

import asyncio
import os
import urllib.request
from typing import Any

from aiohttp.test_utils import TestClient

from gateway.backups.storage import STORE

from .conftest import Harness, StartGateway
from .support import bearer, delete_as, location_for, new_backup_id, token_for


async def gateway_for(start_gateway: StartGateway, harness: Harness) -> TestClient:
    return await start_gateway(harness.storage())


async def delete(client: TestClient, sid: str, bid: str, org: str = "org_c1") -> Any:
    return await delete_as(client, bid, sid, org)


async def test_delete_removes_exactly_the_backup_and_its_sidecar(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await gateway_for(start_gateway, harness)
    bid = new_backup_id(".tar.gz")
    target = location_for("org_c1", bid)
    harness.put(target)
    # Neighbours that share a prefix, a folder, or the id in another system.
    harness.put(location_for("org_c1", new_backup_id()))
    harness.put_key(target.relative_key + "2")
    harness.put_key(target.relative_key + ".bak")
    harness.put_key(target.relative_key.removesuffix(".tar.gz"))
    harness.put(location_for("org_c1b", bid))
    harness.put_key(f"org_c1/OTHER-KEY/{bid}")
    before = harness.keys()

    resp = await delete(client, "sys_c1", bid)

    assert resp.status == 200
    assert (await resp.json())["data"] == {"system_id": "sys_c1", "backup_id": bid}
    # Local keeps metadata in a sidecar file that goes with the data; S3 in the object itself.
    gone = {target.relative_key, target.relative_key + ".meta.json"}
    assert harness.keys() == before - gone


async def test_backup_without_sidecar_deletes(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await gateway_for(start_gateway, harness)
    bid = new_backup_id(".bin")
    harness.put(location_for("org_c1", bid), sidecar=False)
    resp = await delete(client, "sys_c1", bid)
    assert resp.status == 200
    assert not harness.exists(location_for("org_c1", bid))


async def test_absent_backup_is_404_and_nothing_changes(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await gateway_for(start_gateway, harness)
    other = location_for("org_c1", new_backup_id())
    harness.put(other)
    bid = new_backup_id()
    # an orphan sidecar is not a backup
    harness.put_key(location_for("org_c1", bid).relative_key + ".meta.json")
    before = harness.keys()
    resp = await delete(client, "sys_c1", bid)
    assert resp.status == 404
    assert await resp.json() == {"code": 404, "message": "backup not found", "data": {}}
    assert harness.keys() == before


async def test_second_delete_is_404(start_gateway: StartGateway, harness: Harness) -> None:
    client = await gateway_for(start_gateway, harness)
    bid = new_backup_id()
    harness.put(location_for("org_c1", bid))
    assert (await delete(client, "sys_c1", bid)).status == 200
    assert (await delete(client, "sys_c1", bid)).status == 404
    assert not harness.exists(location_for("org_c1", bid))


async def test_denied_caller_leaves_storage_untouched(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await gateway_for(start_gateway, harness)
    bid = new_backup_id()
    harness.put(location_for("org_c2", bid))
    before = harness.keys()
    resp = await delete(client, "sys_c2", bid, org="org_c1")
    assert resp.status == 403
    assert harness.keys() == before


async def test_concurrent_deletes_of_one_backup(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await gateway_for(start_gateway, harness)
    bid = new_backup_id()
    harness.put(location_for("org_c1", bid))
    statuses = [
        r.status for r in await asyncio.gather(*(delete(client, "sys_c1", bid) for _ in range(16)))
    ]
    assert set(statuses) <= {200, 404}
    if harness.name == "local":  # both modes
        # DESIGN.md §4: on local disk exactly one wins.
        assert statuses.count(200) == 1
    else:
        # On S3 several may answer 200 (HEAD then DELETE is not atomic); at least one does.
        assert statuses.count(200) >= 1
    assert not harness.exists(location_for("org_c1", bid))


async def test_many_distinct_deletes_in_parallel(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await gateway_for(start_gateway, harness)
    ids = [new_backup_id() for _ in range(40)]
    keep = location_for("org_c1", new_backup_id())
    harness.put(keep)
    for bid in ids:
        harness.put(location_for("org_c1", bid))
    statuses = [r.status for r in await asyncio.gather(*(delete(client, "sys_c1", b) for b in ids))]
    assert statuses == [200] * len(ids)
    assert harness.keys() - {keep.relative_key + ".meta.json"} == {keep.relative_key}


async def test_readyz_is_ready_with_reachable_storage(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await gateway_for(start_gateway, harness)
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["data"]["checks"] == {"directory": "ok", "storage": "ok"}


async def test_a_download_goes_the_way_the_store_declares(
    start_gateway: StartGateway, harness: Harness
) -> None:
    """A presigning store hands out its own URL; a store whose bytes the gateway serves, a
    link to this gateway. Either way the URL gives the backup's bytes."""
    client = await gateway_for(start_gateway, harness)
    can = client.app[STORE].capabilities
    assert can.stores_uploads and can.presigns != can.serves_bytes
    bid = new_backup_id()
    data = os.urandom(2048)
    harness.put_backup(location_for("org_c1", bid), data, "b.tar.gz")
    resp = await client.get(
        f"/api/systems/sys_c1/backups/{bid}/download", headers=bearer(token_for("org_c1"))
    )
    url = (await resp.json())["data"]["download_url"]
    assert url.startswith("/api/backups/content/") == can.serves_bytes
    if can.serves_bytes:
        assert await (await client.get(url)).read() == data
    else:

        def fetch() -> bytes:
            with urllib.request.urlopen(url, timeout=10) as answer:  # no credentials
                body: bytes = answer.read()
                return body

        assert await asyncio.to_thread(fetch) == data


async def test_a_store_that_keeps_nothing_declares_nothing(start_gateway: StartGateway) -> None:
    """The `none` backend: no capability, so no route reaches an operation (the upload's
    503 is tests/test_uploads.py's)."""
    client = await start_gateway({"backend": "none"})
    can = client.app[STORE].capabilities
    assert not (can.stores_uploads or can.presigns or can.serves_bytes or can.streams_restore)
    resp = await client.get(
        f"/api/systems/sys_c1/backups/{new_backup_id()}/download",
        headers=bearer(token_for("org_c1")),
    )
    body = await resp.json()
    assert (resp.status, body["message"]) == (503, "backup storage not configured")
