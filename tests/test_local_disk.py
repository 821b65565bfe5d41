"""What only the local backend promises: no symlink followed, durable deletes, root checks."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from storage_backends.local import fs as local_fs

from .support import LocalHarness, location_for, new_backup_id, token_for
from .support import delete_as as delete


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the backup root holding a victim file."""
    victim_dir = tmp_path / "outside"
    victim_dir.mkdir()
    return victim_dir


async def test_symlinked_backup_file_is_404_and_target_survives(
    local_gateway: TestClient,
    local_harness: LocalHarness,
    outside: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bid = new_backup_id()
    victim = outside / "victim.tar.gz"
    victim.write_bytes(b"precious")
    folder = local_harness.root / "org_c1" / "KEY-C1"
    folder.mkdir(parents=True)
    (folder / bid).symlink_to(victim)
    with caplog.at_level(logging.WARNING):
        resp = await delete(local_gateway, bid)
    assert resp.status == 404
    assert (await resp.json())["message"] == "backup not found"
    assert victim.read_bytes() == b"precious"
    assert (folder / bid).is_symlink()
    assert any("symlink" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("level", ["organization", "system_key"])
async def test_symlinked_directory_is_404_and_target_survives(
    local_gateway: TestClient,
    local_harness: LocalHarness,
    outside: Path,
    level: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bid = new_backup_id()
    # The attacker's tree holds a file at the exact name the gateway would delete.
    if level == "organization":
        (outside / "KEY-C1").mkdir()
        (outside / "KEY-C1" / bid).write_bytes(b"precious")
        local_harness.root.mkdir(parents=True, exist_ok=True)
        (local_harness.root / "org_c1").symlink_to(outside)
        victim = outside / "KEY-C1" / bid
    else:
        (outside / bid).write_bytes(b"precious")
        (local_harness.root / "org_c1").mkdir(parents=True)
        (local_harness.root / "org_c1" / "KEY-C1").symlink_to(outside)
        victim = outside / bid
    with caplog.at_level(logging.WARNING):
        resp = await delete(local_gateway, bid)
    assert resp.status == 404
    assert victim.read_bytes() == b"precious"
    assert any("symlink" in r.getMessage() for r in caplog.records)


async def test_sidecar_symlink_is_unlinked_not_followed(
    local_gateway: TestClient, local_harness: LocalHarness, outside: Path
) -> None:
    bid = new_backup_id()
    loc = location_for("org_c1", bid)
    local_harness.put(loc, sidecar=False)
    victim = outside / "victim.json"
    victim.write_text("{}")
    (local_harness.root / (loc.relative_key + ".meta.json")).symlink_to(victim)
    resp = await delete(local_gateway, bid)
    assert resp.status == 200
    assert victim.read_text() == "{}"
    assert local_harness.keys() == set()


async def test_directory_named_like_a_backup_is_404(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    bid = new_backup_id()
    (local_harness.root / "org_c1" / "KEY-C1" / bid).mkdir(parents=True)
    resp = await delete(local_gateway, bid)
    assert resp.status == 404
    assert (local_harness.root / "org_c1" / "KEY-C1" / bid).is_dir()


async def test_inline_delete_fsyncs_the_parent_directory_before_answering(
    start_gateway: Any, local_inline_harness: LocalHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A spy around the real os.fsync: it records which directory was synced, and still syncs.
    # (The I/O process's fsyncs are spied on in test_local_io.py, in the process's own code.)
    local_gateway = await start_gateway(local_inline_harness.storage())
    local_harness = local_inline_harness
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(local_fs.os, "fsync", spy)
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    resp = await delete(local_gateway, bid)
    assert resp.status == 200
    assert str(local_harness.root / "org_c1" / "KEY-C1") in synced
    assert not local_harness.exists(location_for("org_c1", bid))


async def test_file_where_a_folder_belongs_is_404_and_stays(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    (local_harness.root / "org_c1").mkdir(parents=True)
    (local_harness.root / "org_c1" / "KEY-C1").write_bytes(b"not a folder")
    resp = await delete(local_gateway, new_backup_id())
    assert resp.status == 404
    assert (local_harness.root / "org_c1" / "KEY-C1").read_bytes() == b"not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
async def test_unwritable_folder_is_502_and_backup_stays(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    folder = local_harness.root / "org_c1" / "KEY-C1"
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    folder.chmod(0o500)
    try:
        resp = await delete(local_gateway, bid)
    finally:
        folder.chmod(0o700)
    assert resp.status == 502
    assert local_harness.exists(location_for("org_c1", bid))


async def test_readiness_follows_the_root(start_gateway: Any, tmp_path: Path) -> None:
    root = tmp_path / "late-root"
    client = await start_gateway({"backend": "local", "local": {"root": str(root)}})
    resp = await client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert body["code"] == 503
    assert body["data"]["checks"]["storage"] == "unavailable"
    bid = new_backup_id()
    assert (await delete(client, bid)).status == 502
    # the storage comes back: no restart needed
    LocalHarness(root).put(location_for("org_c1", bid))
    assert (await client.get("/readyz")).status == 200
    assert (await delete(client, bid)).status == 200
    assert not LocalHarness(root).exists(location_for("org_c1", bid))


# --------------------------------------------------------------------------- the root marker


async def test_an_unmarked_empty_root_is_unready_and_502_never_404(
    start_gateway: Any, tmp_path: Path
) -> None:
    """An empty, unmarked root is what an unmounted volume leaves: its backups must not
    read as missing (404), nor uploads land on the wrong disk."""
    root = tmp_path / "mount-point"
    root.mkdir()
    client = await start_gateway({"backend": "local", "local": {"root": str(root)}})
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["data"]["checks"]["storage"] == "unavailable"
    resp = await delete(client, new_backup_id())
    assert resp.status == 502 and (await resp.json())["message"] == "failed to delete backup"
    listed = await client.get(
        "/api/systems/sys_c1/backups", headers={"Authorization": f"Bearer {token_for('org_c1')}"}
    )
    assert listed.status == 502
    assert list(root.iterdir()) == []  # nothing written to the mount point


def test_init_root_marks_a_new_volume_and_an_old_root_is_adopted(tmp_path: Path) -> None:
    import subprocess
    import sys

    from .support import write_config

    root = tmp_path / "volume"
    root.mkdir()
    config = write_config(tmp_path, 0, {"backend": "local", "local": {"root": str(root)}})
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "init-root", "--config", str(config)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (root / local_fs.ROOT_MARKER).is_file()
    # a root from before the marker, holding backups: marked at start-up
    old = tmp_path / "old-root"
    (old / "org_c1" / "KEY-C1").mkdir(parents=True)
    assert local_fs.mark_root(old, only_if_in_use=True)
    assert (old / local_fs.ROOT_MARKER).is_file()
    # an empty one is never marked at start-up
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not local_fs.mark_root(empty, only_if_in_use=True)
    assert list(empty.iterdir()) == []


def test_an_unmounted_volume_makes_deletes_502_and_the_gateway_unready(tmp_path: Path) -> None:
    import subprocess

    from .support import (
        free_port,
        http,
        mounted_tmpfs,
        serve_gateway,
        stop_process,
        wait_for_port,
        write_config,
    )

    with mounted_tmpfs(tmp_path / "backups") as root:
        harness = LocalHarness(root)  # marks the volume
        bid = new_backup_id()
        harness.put(location_for("org_c1", bid))
        port = free_port()
        config = write_config(tmp_path, port, harness.storage())
        proc = serve_gateway(config)
        try:
            wait_for_port(port, proc=proc)
            assert http("GET", f"http://127.0.0.1:{port}/readyz")[0] == 200
            subprocess.run(["umount", "-l", str(root)], check=True)  # the volume goes away
            url = f"http://127.0.0.1:{port}/api/systems/sys_c1/backups/{bid}"
            status, body = http("DELETE", url, token_for("org_c1"))
            assert (status, body["message"]) == (502, "failed to delete backup")
            assert http("GET", f"http://127.0.0.1:{port}/readyz")[0] == 503
        finally:
            stop_process(proc)


def test_a_backup_swapped_for_a_symlink_mid_delete_is_404_with_its_sidecar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outside: Path
) -> None:
    """The swap lands exactly between the check and the unlink (os.unlink, wrapped: the
    attacker's rename and symlink run first, then the real unlink)."""
    from storage_backends.errors import BackupNotFound

    harness = LocalHarness(tmp_path / "backups")
    location = location_for("org_c1", new_backup_id())
    harness.put(location, b"precious")
    folder = harness.root / location.organization_id / location.system_key
    real_unlink = os.unlink
    swapped: list[bool] = []

    def swap_then_unlink(path: Any, *, dir_fd: int | None = None) -> None:
        if not swapped and path == location.backup_id:
            swapped.append(True)
            os.rename(folder / location.backup_id, outside / "moved")  # the data, elsewhere
            os.symlink(outside / "moved", folder / location.backup_id)
        real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(local_fs.os, "unlink", swap_then_unlink)
    root_fd = local_fs.open_root(harness.root)
    try:
        with pytest.raises(BackupNotFound):
            local_fs.unlink_backup(root_fd, location)
    finally:
        os.close(root_fd)
    assert swapped
    assert (outside / "moved").read_bytes() == b"precious"
    assert (folder / (location.backup_id + ".meta.json")).exists()  # the sidecar stays
