"""A backup's state on S3 (DESIGN.md §11), on moto and SeaweedFS: marks under
`{prefix}.state/`, never in a system's folder; a stale mark makes nothing appear; the
start-up sweep prunes a backlog and takes the pruned backups' marks with them; with
`storage.s3.object_lock` a protected backup carries an S3 legal hold (both servers support
Object Lock on a bucket made with it)."""

from __future__ import annotations

import signal
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from gateway.backups.storage import STORE
from gateway.config_loader import ConfigError
from storage_backends import StorageUnavailable

from .conftest import S3Server, StartGateway
from .support import (
    OutputWatcher,
    S3Harness,
    bearer,
    free_port,
    location_for,
    make_config,
    new_backup_id,
    s3_client,
    serve_gateway,
    token_for,
    wait_for_port,
    write_config,
)
from .test_protection import listed, protect
from .test_retention import ONLY_LAST, id_at
from .test_uploads import KEY, backups_of, upload


def new_bucket() -> str:
    return f"bkt-{uuid.uuid4().hex[:12]}"


def mark(backup_id: str, name: str = "protected") -> str:
    return f".state/org_c1/{KEY}/{backup_id}/{name}"


async def test_protection_is_a_mark_under_the_state_prefix(
    start_gateway: StartGateway, s3_server: S3Server
) -> None:
    """Never under `{prefix}{org}/{key}/`, whose every key the platform's services list and
    prune; the prefix is joined as written."""
    harness = S3Harness(s3_server.endpoint, new_bucket(), prefix="tenant-a/")
    client = await start_gateway(harness.storage())
    bid = new_backup_id()
    harness.put(location_for("org_c1", bid))
    before = harness.keys()
    assert (await protect(client, bid))[0] == 200
    assert harness.keys() - before == {mark(bid)}
    raw = harness.client.list_objects_v2(Bucket=harness.bucket, Prefix="tenant-a/.state/")
    assert [o["Key"] for o in raw["Contents"]] == ["tenant-a/" + mark(bid)]
    assert (await listed(client))[bid]["protected"] is True
    assert (await protect(client, bid, False))[0] == 200
    assert harness.keys() == before


async def test_a_delete_takes_the_backups_marks_with_it(
    start_gateway: StartGateway, s3_harness: S3Harness
) -> None:
    """The delete reads the backup's marks once (is it protected?) and drops those same
    marks after the object: nothing of it is left under the state prefix."""
    client = await start_gateway(s3_harness.storage())
    bid, other = new_backup_id(), new_backup_id()
    for backup_id in (bid, other):
        s3_harness.put(location_for("org_c1", backup_id))
        s3_harness.put_key(mark(backup_id, "verified/ok/2026-12-01T00:00:00Z"), b"")
    before = s3_harness.keys()
    resp = await client.delete(
        f"/api/systems/sys_c1/backups/{bid}", headers=bearer(token_for("org_c1"))
    )
    assert resp.status == 200
    assert before - s3_harness.keys() == {
        f"org_c1/{KEY}/{bid}",
        mark(bid, "verified/ok/2026-12-01T00:00:00Z"),
    }
    assert s3_harness.keys() - before == set()


async def test_a_stale_mark_makes_nothing_appear(
    start_gateway: StartGateway, s3_harness: S3Harness
) -> None:
    client = await start_gateway(s3_harness.storage())
    bid, ghost = new_backup_id(), new_backup_id()
    s3_harness.put(location_for("org_c1", bid))
    for key in (mark(ghost), mark(ghost, "verified/ok/2026-12-01T00:00:00Z"), mark("junk")):
        s3_harness.put_key(key, b"")
    assert {b: i["protected"] for b, i in (await listed(client)).items()} == {bid: False}
    token = bearer(token_for("org_c1"))
    for resp in (
        await client.get(f"/api/systems/sys_c1/backups/{ghost}/download", headers=token),
        await client.delete(f"/api/systems/sys_c1/backups/{ghost}", headers=token),
    ):
        assert (resp.status, (await resp.json())["message"]) == (404, "backup not found")
    assert (await protect(client, ghost))[0] == 404
    folders = await client.app[STORE].system_folders()
    assert [(f.organization_id, f.system_key) for f in folders] == [("org_c1", KEY)]


# --------------------------------------------------------------------------- the sweep


def test_the_start_up_sweep_prunes_a_backlog_and_its_marks(
    tmp_path: Path, s3_server: S3Server
) -> None:
    """Six backups where the rules keep two: the protected oldest stays, the other three
    go with their marks (one carries a mark of another kind, as the verifier's will)."""
    harness = S3Harness(s3_server.endpoint, new_bucket())
    now = datetime.now(UTC)
    planted = sorted(id_at(now - timedelta(minutes=m)) for m in range(1, 7))
    for backup_id in planted:
        harness.put(location_for("org_c1", backup_id))
    harness.put_key(mark(planted[0]), b"")
    harness.put_key(mark(planted[1], "verified/ok/2026-12-01T00:00:00Z"), b"")
    port = free_port()
    storage = {**harness.storage(), "retention": {"keep_last": 2, **ONLY_LAST}}
    proc = serve_gateway(write_config(tmp_path, port, storage))
    output = OutputWatcher(proc)
    try:
        wait_for_port(port, proc=proc)
        records = output.wait_for(
            lambda rs: rs if any(r["msg"] == "retention sweep done" for r in rs) else None
        )
        pruned = {
            r["backup_id"]
            for r in records
            if r["msg"] == "backup prune" and r.get("outcome") == "backup pruned"
        }
        assert pruned == set(planted[1:4])
        assert backups_of(harness) == [planted[0], *planted[-2:]]
        assert {k for k in harness.keys() if k.startswith(".state/")} == {mark(planted[0])}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        output.wait_closed()
    assert proc.returncode == 0


# --------------------------------------------------------------------------- legal hold


class LockedHarness(S3Harness):
    """A bucket made with Object Lock (so versioned), no default retention."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint, self.bucket, self.prefix = endpoint, new_bucket(), ""
        self.client = s3_client(endpoint)
        self.client.create_bucket(Bucket=self.bucket, ObjectLockEnabledForBucket=True)

    def hold(self, relative_key: str) -> str:
        answer = self.client.get_object_legal_hold(Bucket=self.bucket, Key=relative_key)
        return str(answer["LegalHold"]["Status"])

    def every_version(self) -> list[Any]:
        answer = self.client.list_object_versions(Bucket=self.bucket)
        return [*answer.get("Versions", []), *answer.get("DeleteMarkers", [])]


async def test_a_protected_backup_carries_a_legal_hold(
    start_gateway: StartGateway, s3_server: S3Server
) -> None:
    harness = LockedHarness(s3_server.endpoint)
    client = await start_gateway(harness.storage(object_lock=True))
    resp, body = await upload(client, b"the good one")
    assert resp.status == 201, body
    bid = body["data"]["id"]
    key = location_for("org_c1", bid).relative_key
    assert (await protect(client, bid))[0] == 200
    assert harness.hold(key) == "ON"
    # not even the bucket's own credentials delete it while it holds
    (version,) = harness.versions(key)
    with pytest.raises(ClientError):
        harness.client.delete_object(Bucket=harness.bucket, Key=key, VersionId=version["VersionId"])
    # nor the store, were it asked (the gateway answers 409 before it asks)
    with pytest.raises(StorageUnavailable):
        await client.app[STORE].delete(location_for("org_c1", bid))
    assert backups_of(harness) == [bid]
    assert (await protect(client, bid, False))[0] == 200
    assert harness.hold(key) == "OFF"
    resp = await client.delete(
        f"/api/systems/sys_c1/backups/{bid}", headers=bearer(token_for("org_c1"))
    )
    assert resp.status == 200
    assert harness.every_version() == []  # every version of the backup and of its mark


def test_object_lock_needs_versioning(tmp_path: Path) -> None:
    storage = {
        "backend": "s3",
        "s3": {"bucket": "b", "object_lock": True, "versioning": "off"},
    }
    with pytest.raises(ConfigError, match=r"storage\.s3\.versioning"):
        make_config(tmp_path, storage)
