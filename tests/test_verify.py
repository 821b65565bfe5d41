"""The verifier (DESIGN.md §12): rot is found within one pass, shown as corrupt, passed over
by the keep rules; `backup-gateway verify` and the background verifier, as real processes."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.backups import verifier as verifier_module
from gateway.backups.system_lock import SystemLocks
from gateway.backups.verifier import Verifier
from gateway.config import load_config
from storage_backends import create_store
from storage_backends.ids import new_uuid7

from .conftest import S3Server
from .support import (
    LocalHarness,
    OutputWatcher,
    S3Harness,
    free_port,
    location_for,
    new_backup_id,
    serve_gateway,
    wait_for_port,
    write_config,
)

KEY = "KEY-C1"


def plant(harness: LocalHarness, minutes_ago: int, data: bytes, sha256: bool = True) -> str:
    """A backup as an upload leaves it, `minutes_ago` old by its id."""
    at = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    backup_id = new_uuid7(int(at.timestamp() * 1000)) + ".tar.gz"
    location = location_for("org_c1", backup_id)
    harness.put(location, data, sidecar=False)
    meta: dict[str, Any] = {"filename": "b.tar.gz", "uploaded_at": at.isoformat()}
    if sha256:
        meta["sha256"] = hashlib.sha256(data).hexdigest()
    (harness.root / (location.relative_key + ".meta.json")).write_text(json.dumps(meta))
    return backup_id


def rot(harness: LocalHarness, backup_id: str) -> None:
    """Flip one byte in place: same size, same mtime, as a failing disk would."""
    path = harness.root / "org_c1" / KEY / backup_id
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def sidecar(harness: LocalHarness, backup_id: str) -> dict[str, Any]:
    path = harness.root / "org_c1" / KEY / (backup_id + ".meta.json")
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def run_verify(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "verify", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_command_finds_a_flipped_byte_and_exits_1(tmp_path: Path) -> None:
    harness = LocalHarness(tmp_path / "backups")
    good = [plant(harness, m, os.urandom(100_000)) for m in (30, 20)]
    bad = plant(harness, 10, os.urandom(100_000))
    unknown = plant(harness, 5, b"no sha256 was stored", sha256=False)
    rot(harness, bad)
    config = write_config(tmp_path, free_port(), harness.storage())
    done = run_verify(config)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.strip().splitlines()
    assert f"corrupt: org_c1/{KEY}/{bad}" in lines
    assert lines[-1].startswith("verified 4 backups")
    assert "2 ok, 1 corrupt, 1 unverifiable, 0 error" in lines[-1]
    assert sidecar(harness, bad)["integrity"] == "corrupt"
    assert all(sidecar(harness, b)["integrity"] == "ok" for b in good)
    assert "integrity" not in sidecar(harness, unknown)  # a hash computed now is no reference
    assert harness.exists(location_for("org_c1", bad))  # still there, still restorable
    # one system only, and a clean one exits 0
    clean = run_verify(config, "--system", "sys_c1b")
    assert clean.returncode == 0 and "verified 0 backups" in clean.stdout


def test_a_corrupt_backup_never_takes_a_good_ones_slot(tmp_path: Path) -> None:
    """keep_last 1: the newest is corrupt, so the older good one is kept and the corrupt one
    pruned, audited as corrupt."""
    harness = LocalHarness(tmp_path / "backups")
    older = plant(harness, 60, b"good and older")
    newest = plant(harness, 1, b"rotten and newest")
    rot(harness, newest)
    retention = {"keep_last": 1, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}
    config = write_config(tmp_path, free_port(), {**harness.storage(), "retention": retention})
    assert run_verify(config).returncode == 1
    port = int(config.read_text().split("port: ")[1].split()[0])
    proc = serve_gateway(config)
    output = OutputWatcher(proc)
    try:
        wait_for_port(port, proc=proc)
        pruned = output.wait_for(
            lambda rs: [r for r in rs if r["msg"] == "backup prune" and r.get("outcome")]
        )
        assert [(r["backup_id"], r["reason"]) for r in pruned] == [(newest, "corrupt")]
        assert not harness.exists(location_for("org_c1", newest))
        assert harness.exists(location_for("org_c1", older))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_background_verifier_finds_rot_and_counts_it(tmp_path: Path) -> None:
    harness = LocalHarness(tmp_path / "backups")
    bad = plant(harness, 5, os.urandom(50_000))
    plant(harness, 4, os.urandom(50_000))
    rot(harness, bad)
    port = free_port()
    config = write_config(tmp_path, port, {**harness.storage(), "verify": {"enabled": True}})
    proc = serve_gateway(config)
    output = OutputWatcher(proc)
    try:
        wait_for_port(port, proc=proc)
        found = output.wait_for(
            lambda rs: [
                r for r in rs if r["msg"] == "backup corrupt" and r["logger"] == "gateway.audit"
            ]
        )
        assert found[0]["backup_id"] == bad
        errors = [r for r in output.records() if r["level"] == "error" and bad in r["msg"]]
        assert errors
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        assert "gateway_backups_corrupt 1.0" in text
        assert 'gateway_backup_verifications_total{outcome="corrupt"} 1.0' in text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_one_verifier_per_system_at_a_time(tmp_path: Path) -> None:
    """While another process holds the system's verify lock, this pass reads nothing of it."""
    harness = LocalHarness(tmp_path / "backups")
    backup_id = plant(harness, 5, b"some bytes")
    config = write_config(tmp_path, free_port(), harness.storage())
    lock = harness.root / "org_c1" / KEY / ".verify.lock"
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = run_verify(config)
    assert busy.returncode == 0, busy.stderr
    assert "0 ok" in busy.stdout
    assert "integrity" not in sidecar(harness, backup_id)
    done = run_verify(config)
    assert "1 ok" in done.stdout and sidecar(harness, backup_id)["integrity"] == "ok"


def test_an_overwritten_object_on_s3_is_found(tmp_path: Path, s3_server: S3Server) -> None:
    """The body replaced under the same key and metadata (a bucket that rots, or a writer
    that is not the gateway): `verify` reads it, finds it corrupt, and keeps the verdict in
    a mark under {prefix}.state/, never beside the backups."""
    harness = S3Harness(s3_server.endpoint, f"verify-{free_port()}")
    good, bad = new_backup_id(), new_backup_id()
    for backup_id in (good, bad):
        harness.put_backup(location_for("org_c1", backup_id), b"the original bytes", "b.tgz")
    original = harness.client.head_object(Bucket=harness.bucket, Key=f"org_c1/{KEY}/{bad}")
    harness.client.put_object(
        Bucket=harness.bucket,
        Key=f"org_c1/{KEY}/{bad}",
        Body=b"the rotten! bytes!",
        Metadata=original["Metadata"],
    )
    config = write_config(tmp_path, free_port(), harness.storage())
    done = run_verify(config)
    assert done.returncode == 1, done.stderr
    assert f"corrupt: org_c1/{KEY}/{bad}" in done.stdout
    assert "1 ok, 1 corrupt" in done.stdout
    marks = {k for k in harness.keys() if k.startswith(".state/")}
    assert {tuple(m.split("/")[3:6]) for m in marks} == {
        (good, "verified", "ok"),
        (bad, "verified", "corrupt"),
    }
    assert not [k for k in harness.keys() if k.startswith(f"org_c1/{KEY}/") and "verified" in k]


async def test_a_pass_holds_one_batch_at_a_time_and_reads_each_backup_once(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """More backups than a batch: the pass reads them in rounds (each a listing that keeps
    the most due), never-verified first, each exactly once, and ends; one without a sha256
    is counted once and never read. The real local store, in this process, with the batch
    made small."""
    monkeypatch.setattr(verifier_module, "BATCH", 3)
    harness = LocalHarness(tmp_path / "backups")
    planted = [plant(harness, 60 - m, os.urandom(2_000)) for m in range(10)]
    unknown = plant(harness, 1, b"no sha256 was stored", sha256=False)
    rot(harness, planted[4])
    config = load_config(write_config(tmp_path, free_port(), harness.storage()), environ={})
    store = create_store(config.storage)
    await store.start()
    try:
        locks = SystemLocks(store, None, purpose="verify")
        verifier = Verifier(config.storage.verify, store, locks, 1e12)
        seen: list[tuple[str, str]] = []
        await asyncio.wait_for(
            verifier.run_pass(progress=lambda d, o: seen.append((d.info.id, o)), force=True), 60
        )
    finally:
        await store.close()
    assert seen.count((unknown, "unverifiable")) == 1
    read = [(b, o) for b, o in seen if b != unknown]
    assert [b for b, _ in read] == planted  # oldest upload first, each once
    assert dict(read)[planted[4]] == "corrupt"
    assert [o for _, o in read].count("ok") == 9
    assert all("integrity" in sidecar(harness, b) for b in planted)
    assert verifier.outcomes == {"ok": 9, "corrupt": 1, "unverifiable": 1}


def test_tiny_backups_cost_a_mebibyte_of_the_budget_each(tmp_path: Path) -> None:
    """Each backup read costs at least 1 MiB of the byte budget (its open, lock and durable
    state write cost that much), so a folder of tiny backups is not rewritten hundreds of
    times a second: six of ten bytes at 4 MiB/s are verified 0.25 s apart, by the times
    recorded with them: five intervals, 1.25 s, of which one is left for the jitter of each
    stamp on a busy machine (a stamp is taken after the backup's read and durable state
    write, which took 31 ms longer for the first than the last under two busy loops).
    Without the least charge the six take milliseconds."""
    harness = LocalHarness(tmp_path / "backups")
    planted = [plant(harness, 10 + m, b"ten bytes!") for m in range(6)]
    config = write_config(tmp_path, free_port(), harness.storage())
    done = run_verify(config, "--max-bytes-per-second", str(4 << 20))
    assert done.returncode == 0 and "6 ok" in done.stdout, done.stdout + done.stderr
    stamps = sorted(datetime.fromisoformat(sidecar(harness, b)["verified_at"]) for b in planted)
    assert (stamps[-1] - stamps[0]).total_seconds() >= 4 * 0.25
