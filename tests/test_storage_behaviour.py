"""One behaviour suite, run against every real backend (local disk and an S3 server)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import urllib.request
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.backups.storage import STORE
from storage_backends import BackupNotFound, BackupStore, SystemFolder
from storage_backends.base import READ_CHUNK_BYTES

from .conftest import Harness, StartGateway
from .support import (
    bearer,
    delete_as,
    location_for,
    new_backup_id,
    system_key_of,
    token_for,
)


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


# --------------------------------------------------------------------------- state (§11)


def folder_of(org_id: str) -> SystemFolder:
    return SystemFolder(org_id, system_key_of(org_id))


async def protection_of(store: BackupStore, org_id: str) -> dict[str, bool]:
    """What a whole listing, the newest-first listing and each description say."""
    folder = folder_of(org_id)
    listed = {b.id: b.protected for b in await store.list_backups(folder)}
    newest = await store.list_newest(folder, 100)
    assert {b.id: b.protected for b in newest.backups} == listed
    for backup_id, protected in listed.items():
        assert (await store.describe(folder.location(backup_id))).protected == protected
    return listed


async def test_protection_is_kept_with_the_backup_and_undone(
    start_gateway: StartGateway, harness: Harness
) -> None:
    """Set through the store (the route's checks are tests/test_protection.py's): every
    listing says so, setting it twice changes nothing, and unprotecting leaves storage as
    it was."""
    client = await gateway_for(start_gateway, harness)
    store = client.app[STORE]
    assert store.capabilities.keeps_state
    bid, other = new_backup_id(), new_backup_id()
    harness.put(location_for("org_c1", bid))
    harness.put(location_for("org_c1", other))
    before = harness.keys()
    for _ in range(2):
        await store.set_protected(location_for("org_c1", bid), True)
        assert await protection_of(store, "org_c1") == {bid: True, other: False}
    for _ in range(2):
        await store.set_protected(location_for("org_c1", bid), False)
        assert await protection_of(store, "org_c1") == {bid: False, other: False}
    assert harness.keys() == before


async def test_protecting_an_absent_backup_is_not_found(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await gateway_for(start_gateway, harness)
    store = client.app[STORE]
    harness.put(location_for("org_c1", new_backup_id()))
    before = harness.keys()
    for protected in (True, False):
        with pytest.raises(BackupNotFound):
            await store.set_protected(location_for("org_c1", new_backup_id()), protected)
    assert harness.keys() == before


async def test_a_deleted_backup_takes_its_state_with_it(
    start_gateway: StartGateway, harness: Harness
) -> None:
    """The store deletes what it is told to (the gateway refuses a protected backup before
    asking it): nothing of the backup's state is left, and a backup uploaded later is not
    protected."""
    client = await gateway_for(start_gateway, harness)
    store = client.app[STORE]
    bid, other = new_backup_id(), new_backup_id()
    harness.put(location_for("org_c1", other))
    before = harness.keys()
    harness.put(location_for("org_c1", bid))
    await store.set_protected(location_for("org_c1", bid), True)
    await store.set_protected(location_for("org_c1", other), True)
    await store.set_protected(location_for("org_c1", other), False)
    await store.delete(location_for("org_c1", bid))
    assert harness.keys() == before
    assert await protection_of(store, "org_c1") == {other: False}


async def test_system_folders_are_the_folders_of_systems(
    start_gateway: StartGateway, harness: Harness
) -> None:
    """Every `{org}/{key}/` that holds a backup, whatever else the store holds beside
    (staging, state, hidden or odd names, loose keys)."""
    client = await gateway_for(start_gateway, harness)
    store = client.app[STORE]
    assert store.capabilities.lists_folders
    bid = new_backup_id()
    harness.put(location_for("org_c1", bid))
    harness.put(location_for("org_c2", new_backup_id()))
    await store.set_protected(location_for("org_c1", bid), True)
    for odd in (".uploads/x", ".hidden/KEY/x", "org_c1/.hidden/x", "loose", "org_c2/loose"):
        harness.put_key(odd)
    assert sorted(await store.system_folders(), key=lambda f: f.system_key) == [
        folder_of("org_c1"),
        folder_of("org_c2"),
    ]


async def test_folder_summaries_count_each_folders_backups_in_one_pass(
    start_gateway: StartGateway, harness: Harness
) -> None:
    """The fleet's scan (DESIGN.md §13): per folder holding a backup, its count, the bytes
    of its data (never sidecars or state marks) and its largest id — nothing for staging,
    state, hidden or odd names, and folders spread over many pages of a listing."""
    client = await gateway_for(start_gateway, harness)
    store = client.app[STORE]
    older, newer = new_backup_id(), new_backup_id()
    while newer <= older:
        newer = new_backup_id()
    harness.put(location_for("org_c1", older), b"x" * 10)
    harness.put(location_for("org_c1", newer), b"y" * 32)
    harness.put(location_for("org_c2", newer), b"z" * 7)
    await store.set_protected(location_for("org_c1", older), True)
    for odd in (".uploads/x", ".hidden/KEY/x", "org_c1/.hidden/x", "loose", "org_c2/loose"):
        harness.put_key(odd)
    harness.put_key(f"org_c1/KEY-C1/deeper/{new_backup_id()}")
    harness.put_key("org_empty/KEY-EMPTY/not-a-backup")
    summaries = [s async for batch in store.folder_summaries() for s in batch]
    found = [(s.folder, s.count, s.total_bytes, s.newest_id) for s in summaries]
    assert sorted(found, key=lambda row: row[0].system_key) == [
        (folder_of("org_c1"), 2, 42, newer),
        (folder_of("org_c2"), 1, 7, newer),
    ]
    # one folder at a time, as the fleet index re-reads a folder it changed: the same
    for folder, count, total, newest in found:
        one = await store.summarize_folder(folder)
        assert one is not None
        assert (one.folder, one.count, one.total_bytes, one.newest_id) == (
            folder,
            count,
            total,
            newest,
        )
    assert await store.summarize_folder(folder_of("org_empty")) is None


# --------------------------------------------------------------------------- restore (§10)


async def test_a_reader_streams_exact_ranges_in_bounded_pieces(
    start_gateway: StartGateway, harness: Harness
) -> None:
    """The one streaming read every store has (the restore's): what `open_reader` says of
    the backup, then any range of its bytes, never a piece over READ_CHUNK_BYTES."""
    client = await gateway_for(start_gateway, harness)
    store = client.app[STORE]
    assert store.capabilities.streams_restore
    data = os.urandom(3 * READ_CHUNK_BYTES + 123)
    location = location_for("org_c1", new_backup_id())
    harness.put_backup(location, data, "b.tar.gz")
    before = harness.keys()
    reader = await store.open_reader(location)
    try:
        assert (reader.info.id, reader.info.size) == (location.backup_id, len(data))
        assert reader.info.sha256 == hashlib.sha256(data).hexdigest()
        for offset, count in [
            (0, len(data)),
            (5, 10),
            (READ_CHUNK_BYTES - 1, READ_CHUNK_BYTES + 2),
            (len(data) - 1, 1),
        ]:
            pieces = [piece async for piece in reader.chunks(offset, count)]
            assert all(0 < len(piece) <= READ_CHUNK_BYTES for piece in pieces)
            assert b"".join(pieces) == data[offset : offset + count]
    finally:
        await reader.close()
    assert harness.keys() == before
    for absent in (
        location_for("org_c1", new_backup_id()),
        location_for("org_c1b", location.backup_id),
    ):
        with pytest.raises(BackupNotFound):
            await store.open_reader(absent)
