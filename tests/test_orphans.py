"""Orphans (DESIGN.md §13): folders no system maps to, shown to the Owner and purged by the
command line — never a folder the directory maps, even one it starts to map mid-purge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import Config
from gateway.directory import Directory, create_directory
from gateway.fleet import FleetIndex, find_orphans, purge_orphans
from storage_backends import BackupLocation, create_store

from .conftest import StartGateway, postgres_directory
from .servers import PlatformDatabase
from .support import (
    DIRECTORY,
    LocalHarness,
    bearer,
    eventually,
    free_port,
    location_for,
    make_config,
    token_for,
    write_config,
)
from .test_fleet import backup_id_at, now_ms

DAY_MS = 86_400_000


def arrange(harness: LocalHarness, age_ms: int) -> dict[str, BackupLocation]:
    """One backup of each kind of folder, `age_ms` old; the orphans are the first three."""
    when = now_ms() - age_ms
    places = {
        # an organization the directory does not know (destroyed)
        "unknown organization": BackupLocation("org_destroyed", "KEY-X", backup_id_at(when)),
        # a key no system holds
        "unknown key": BackupLocation("org_c1", "KEY-NOBODY", backup_id_at(when)),
        # sys_c2 (KEY-C2) belongs to org_c2 now: its old folder under org_c1
        "moved system": BackupLocation("org_c1", "KEY-C2", backup_id_at(when)),
        # sys_deleted is soft-deleted: its backups stay for a restore
        "soft-deleted system": BackupLocation("org_c1", "KEY-DELETED", backup_id_at(when)),
        "live system": location_for("org_c1", backup_id_at(when)),
    }
    for location in places.values():
        harness.put(location, b"12345")
    return places


ORPHANS = ["unknown organization", "unknown key", "moved system"]


def folder_of(location: BackupLocation) -> tuple[str, str]:
    return (location.organization_id, location.system_key)


async def test_the_owner_sees_every_kind_of_orphan_and_no_mapped_folder(
    start_gateway: StartGateway, local_harness: LocalHarness, directory_section: dict[str, Any]
) -> None:
    places = arrange(local_harness, DAY_MS)
    client = await start_gateway(local_harness.storage(), directory=directory_section)
    owner = bearer(token_for("org_owner"))

    async def listed() -> Any:
        resp = await client.get("/api/backups/orphans", headers=owner)
        return await resp.json() if resp.status == 200 else None

    body = await eventually(listed, "the first scan")
    found = {(o["organization_id"], o["system_key"]): o for o in body["data"]["orphans"]}
    assert set(found) == {folder_of(places[kind]) for kind in ORPHANS}
    for item in found.values():
        assert (item["backups"], item["bytes"]) == (1, 5)
        assert item["newest_backup_at"].endswith("Z")
    assert body["data"]["scanned_at"].endswith("Z")


async def test_orphans_are_the_owners_only(
    start_gateway: StartGateway, local_harness: LocalHarness, directory_section: dict[str, Any]
) -> None:
    client = await start_gateway(local_harness.storage(), directory=directory_section)
    for caller, role in [
        ("org_d1", None),
        ("org_c1", None),
        ("org_d1", "owner"),  # a forged claim: the directory says distributor
        ("org_unknown", "owner"),
    ]:
        resp = await client.get("/api/backups/orphans", headers=bearer(token_for(caller, role)))
        body = await resp.json()
        assert (resp.status, body["message"], body["data"]) == (
            403,
            "insufficient permissions",
            {},
        ), caller


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "orphans", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_command_lists_and_purges_only_old_orphans(tmp_path: Path) -> None:
    harness = LocalHarness(tmp_path / "backups")
    old = arrange(harness, 3 * DAY_MS)
    young = BackupLocation("org_young", "KEY-Y", backup_id_at(now_ms() - 3_600_000))
    harness.put(young, b"young")
    config = write_config(tmp_path, free_port(), harness.storage(io="inline"))
    listed = cli(config)
    assert listed.returncode == 0, listed.stderr
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {(o["organization_id"], o["system_key"]) for o in lines} == {
        *(folder_of(old[kind]) for kind in ORPHANS),
        folder_of(young),
    }
    assert all(harness.exists(location) for location in [*old.values(), young])

    purged = cli(config, "--purge", "--older-than-days", "1")
    assert purged.returncode == 0, purged.stderr
    for kind in ORPHANS:
        location = old[kind]
        assert not harness.exists(location), kind
        # data, sidecar and the emptied folder: nothing of it is left
        assert not (harness.root / location.organization_id / location.system_key).exists()
    assert not (harness.root / "org_destroyed").exists()
    assert harness.exists(young)
    assert harness.exists(old["soft-deleted system"]) and harness.exists(old["live system"])
    audit = [json.loads(line) for line in purged.stderr.splitlines() if "orphan purge" in line]
    assert sorted(a["backup_id"] for a in audit if a["outcome"] == "backup purged") == sorted(
        old[kind].backup_id for kind in ORPHANS
    )
    assert "purged 3 folders (3 backups, 15 bytes); 0 left" in purged.stderr


async def orphans_now(config: Config, directory: Directory) -> tuple[Any, Any]:
    store = create_store(config.storage)
    await store.start()
    index = FleetIndex(config.fleet, store, directory)
    assert await index.scan()
    return store, await find_orphans(index, directory)


async def test_a_folder_the_file_directory_maps_mid_purge_is_never_touched(
    tmp_path: Path, directory_file: Path
) -> None:
    harness = LocalHarness(tmp_path / "backups")
    old = arrange(harness, 3 * DAY_MS)
    config = make_config(tmp_path, harness.storage(io="inline"))
    directory = create_directory(config.directory)
    store, found = await orphans_now(config, directory)
    try:
        assert len(found) == 3
        # after the listing, before the purge: a system is registered on one orphan's key
        changed = {**DIRECTORY, "systems": [*DIRECTORY["systems"]]}
        changed["systems"].append(
            {"id": "sys_new", "system_key": "KEY-NOBODY", "organization_id": "org_c1"}
        )
        directory_file.write_text(yaml.safe_dump(changed))
        done = await purge_orphans(store, directory, found, now_ms() - DAY_MS)
    finally:
        await store.close()
    assert harness.exists(old["unknown key"])
    assert not harness.exists(old["unknown organization"])
    assert not harness.exists(old["moved system"])
    assert [(f.system_key, why) for f, why in done.left] == [("KEY-NOBODY", "a system maps it now")]


async def test_a_folder_the_database_maps_mid_purge_is_never_touched(
    tmp_path: Path, platform_db: PlatformDatabase
) -> None:
    harness = LocalHarness(tmp_path / "backups")
    old = arrange(harness, 3 * DAY_MS)
    config = make_config(
        tmp_path, harness.storage(io="inline"), directory=postgres_directory(platform_db)
    )
    directory = create_directory(config.directory)
    await directory.start()
    try:
        store, found = await orphans_now(config, directory)
        try:
            assert len(found) == 3
            await platform_db.execute(
                "INSERT INTO systems (id, name, organization_id, system_key, registered_at)"
                " VALUES ('sys_new', 'n', 'org_c1', 'KEY-NOBODY', now())"
            )
            done = await purge_orphans(store, directory, found, now_ms() - DAY_MS)
        finally:
            await store.close()
    finally:
        await directory.close()
    assert harness.exists(old["unknown key"])
    assert not harness.exists(old["unknown organization"])
    assert [(f.system_key, why) for f, why in done.left] == [("KEY-NOBODY", "a system maps it now")]


async def test_a_folder_other_files_keep_is_left_and_said_not_counted_purged(
    tmp_path: Path, directory_file: Path
) -> None:
    """An orphan folder that holds a file of someone else's: its backups go, the file and
    the folder stay, and the purge says so instead of counting the folder purged."""
    harness = LocalHarness(tmp_path / "backups")
    old = arrange(harness, 3 * DAY_MS)
    kept = old["unknown key"]
    stray = harness.root / kept.organization_id / kept.system_key / "notes.txt"
    stray.write_text("an operator's note")
    config = make_config(tmp_path, harness.storage(io="inline"))
    directory = create_directory(config.directory)
    store, found = await orphans_now(config, directory)
    try:
        done = await purge_orphans(store, directory, found, now_ms() - DAY_MS)
    finally:
        await store.close()
    assert not any(harness.exists(old[kind]) for kind in ORPHANS)
    assert stray.read_text() == "an operator's note"
    assert [(f.system_key, why) for f, why in done.left] == [
        ("KEY-NOBODY", "its backups purged, other files keep the folder")
    ]
    assert (done.folders, done.backups, done.bytes) == (2, 3, 15)


@pytest.mark.parametrize(
    "args",
    [
        ["--purge", "--older-than-days", "nan"],
        ["--purge", "--older-than-days", "inf"],
        ["--purge", "--older-than-days", "1e400"],
        ["--purge", "--older-than-days", "-1"],
        ["--purge", "--older-than-days", "36501"],
        ["--purge"],
        ["--older-than-days", "1"],  # a cut-off without --purge: not a filter
    ],
)
def test_a_cut_off_that_is_no_number_of_days_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str]
) -> None:
    harness = LocalHarness(tmp_path / "backups")
    arrange(harness, 3 * DAY_MS)
    before = harness.keys()
    config = write_config(tmp_path, free_port(), harness.storage(io="inline"))
    refused = cli(config, *args)
    assert refused.returncode == 2, refused.stderr
    assert refused.stdout == ""  # not even the listing
    (line,) = refused.stderr.strip().splitlines()
    assert "--older-than-days" in line and "Traceback" not in line
    assert harness.keys() == before
