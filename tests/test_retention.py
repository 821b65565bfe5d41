"""Retention that keeps history (DESIGN.md §11), on real storage and real processes.

Each test reproduces a way the first cut lost confirmed backups: concurrent uploads that
pruned each other's new backups, pruning to make room, junk uploads pushing good history
out, a 201 that waited on a stale lock.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.backups.keep_rules import Candidate, KeepPolicy, backup_time, kept_by
from gateway.backups.retention import RETENTION
from gateway.backups.storage import STORE
from storage_backends import SystemFolder
from storage_backends.ids import new_uuid7

from .conftest import Harness, StartGateway
from .servers import RedisServer
from .support import (
    KEEP_EVERYTHING,
    LocalHarness,
    OutputWatcher,
    S3Harness,
    appliance_upload,
    eventually,
    free_port,
    location_for,
    scrape,
    serve_gateway,
    wait_for_port,
    write_config,
)
from .test_restore import envelope_of, put, repr_digest, url
from .test_uploads import KEY, backups_of, basic, upload

ONLY_LAST = {"keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}


def id_at(at: datetime, suffix: str = ".tar.gz") -> str:
    return new_uuid7(int(at.timestamp() * 1000)) + suffix


def _patient(harness: Harness) -> dict[str, Any]:
    """The harness's storage with S3 timeouts for a dozen uploads at once on a busy host
    (the shared test settings give a request one second)."""
    if isinstance(harness, S3Harness):
        return harness.storage(read_timeout_seconds=10, connect_timeout_seconds=5)
    return harness.storage()


async def settled(client: Any) -> None:
    """Wait for the pruning runs the uploads started (they run after the 201)."""
    await client.app[RETENTION].settled()


# --------------------------------------------------------------------------- the rules


async def test_the_newest_are_kept_and_the_rest_pruned_after_the_answer(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway({**harness.storage(), "retention": {"keep_last": 3, **ONLY_LAST}})
    ids = []
    for n in range(5):
        resp, body = await upload(client, b"x" * (10 + n))
        assert resp.status == 201, body
        ids.append(body["data"]["id"])
        await settled(client)
    assert backups_of(harness) == sorted(ids[2:])
    assert await scrape(client, 'gateway_retention_runs_total{outcome="done"}') == 5
    assert await scrape(client, "gateway_retention_prunes_total") == 2


async def test_the_time_rules_keep_history_through_junk_uploads(
    start_gateway: StartGateway, harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The stolen-credential case (issue #28, 10): 20 days of daily backups and older weekly
    and monthly ones; the thief sends 30 junk uploads at an unlimited rate, then asks to
    delete every old backup with the appliance's own credentials. By default each delete
    is 403, nothing deleted, and every backup the rules kept before the attack that is
    older than today is still there and restores byte-exact through the appliance's route,
    as a replaced appliance would fetch it."""
    now = datetime.now(UTC)
    # the appliance's daily backup, the last one earlier today
    today = max(now - timedelta(minutes=1), now.replace(hour=0, minute=0, second=0))
    history = [id_at(today - timedelta(days=d)) for d in range(20)]
    history += [id_at(now - timedelta(weeks=w)) for w in range(4, 8)]
    history += [id_at(now - timedelta(days=31 * m)) for m in range(3, 6)]
    data = {backup_id: f"good backup {backup_id}".encode() for backup_id in history}
    for backup_id, content in data.items():
        put(harness, "org_c1", content, backup_id)  # as an upload leaves it, sha256 and all
    policy = KeepPolicy()  # the defaults: 3 last, 7 daily, 4 weekly, 6 monthly
    kept_before = {
        backup_id
        for backup_id, reasons in kept_by([Candidate(b) for b in history], policy).items()
        if reasons
    }
    assert len(kept_before) > 7
    client = await start_gateway({**harness.storage(), "retention": {"uploads_per_minute": 0}})
    for _ in range(30):
        assert (await upload(client, b"junk"))[0].status == 201
    await settled(client)
    left = set(backups_of(harness))
    start_of_today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    older_than_today = {b for b in kept_before if backup_time(b) < start_of_today}
    assert len(older_than_today) >= 12
    assert older_than_today <= left

    # then every old id deleted with the appliance's credentials: refused, nothing goes
    before = harness.keys()
    with caplog.at_level(logging.INFO, logger="gateway.audit"):
        for backup_id in history:
            assert await envelope_of(await client.delete(url(backup_id), headers=basic())) == (
                403,
                {"code": 403, "message": "appliances may not delete backups", "data": {}},
            )
    denied = [r for r in caplog.records if r.getMessage() == "backup delete"]
    assert len(denied) == len(history)
    assert {r.fields["decision"] for r in denied} == {"deny"}  # type: ignore[attr-defined]
    await settled(client)
    assert harness.keys() == before
    assert set(backups_of(harness)) == left

    # what the rules kept before the attack restores as the appliance fetches it
    for backup_id in older_than_today:
        resp = await client.get(url(backup_id), headers=basic())
        assert resp.status == 200, backup_id
        assert await resp.read() == data[backup_id], backup_id
        assert resp.headers["Repr-Digest"] == repr_digest(data[backup_id])
    for backup_id in older_than_today:  # and a user still downloads it
        resp = await client.get(
            f"/api/systems/sys_c1/backups/{backup_id}/download",
            headers={"Authorization": "Bearer " + _token()},
        )
        assert resp.status == 200


def _token() -> str:
    from .support import token_for

    return token_for("org_c1")


async def test_concurrent_uploads_keep_the_newest(
    start_gateway: StartGateway, harness: Harness
) -> None:
    """One process, 12 overlapping uploads: the 3 kept are the 3 newest, and all are 201."""
    client = await start_gateway(
        {**_patient(harness), "retention": {"keep_last": 3, "uploads_per_minute": 0, **ONLY_LAST}}
    )
    answers = await asyncio.gather(*(upload(client, b"n" * 1000) for _ in range(12)))
    assert [a[0].status for a in answers] == [201] * 12
    await settled(client)
    ids = sorted(a[1]["data"]["id"] for a in answers)
    assert backups_of(harness) == ids[-3:]


async def test_an_empty_upload_is_400_and_stores_nothing(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway(harness.storage())
    resp, body = await upload(client, b"")
    assert (resp.status, body) == (400, {"code": 400, "message": "empty upload", "data": {}})
    assert backups_of(harness) == []


# --------------------------------------------------------------------------- in flight


def _staged_then(
    client: Any, monkeypatch: pytest.MonkeyPatch, then: Callable[[], Awaitable[None]]
) -> None:
    """Run `then` right after each upload's body is staged, before the gateway decides
    what the upload is (a retry, a refusal, a new backup): a prune or a second upload
    that lands in that moment on a busy system."""
    store = client.app[STORE]
    stage = store.stage_upload

    async def staged_then(backup: Any, body: Any) -> Any:
        staged = await stage(backup, body)
        await then()
        return staged

    monkeypatch.setattr(store, "stage_upload", staged_then)


async def test_a_retry_in_flight_pushes_nothing_out(
    start_gateway: StartGateway, harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry staged but not yet known as one is no backup: a prune at that moment keeps
    what it kept. (On S3 a digest upload was one PutObject at its final key, listed from
    then on: the prune took the retry for the newest and pruned the oldest kept backup,
    then the retry was answered 200 and discarded, so a retry pushed history out.)"""
    client = await start_gateway(
        {**_patient(harness), "retention": {"keep_last": 2, **ONLY_LAST, "uploads_per_minute": 0}}
    )
    older = (await upload(client, b"the day before"))[1]["data"]["id"]
    data = b"last night's backup"
    first = await upload(client, data, **{"Content-Digest": _digest(data)})
    assert first[0].status == 201, first[1]
    await settled(client)
    folder = SystemFolder("org_c1", KEY)
    outcomes: list[str] = []

    async def prune() -> None:
        outcomes.append(await client.app[RETENTION].prune_system(folder))

    _staged_then(client, monkeypatch, prune)
    again = await upload(client, data, **{"Content-Digest": _digest(data)})
    assert (again[0].status, again[1]["message"]) == (200, "backup already stored")
    assert again[1]["data"] == first[1]["data"]
    assert outcomes == ["done"]
    await settled(client)
    assert backups_of(harness) == sorted([older, first[1]["data"]["id"]])


async def test_two_identical_uploads_in_flight_never_answer_for_each_other(
    start_gateway: StartGateway, harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sends of the same backup, both staged before either is decided: they are decided
    one after the other under the system's lock, so the first is stored (201) and the
    second, finding it, is answered with it (200), never with a backup that is not there.
    (On S3 each once saw the other's PutObject at its final key, each was answered 200
    `backup already stored` with the other's id and discarded its own: two success
    answers, and nothing stored.)"""
    client = await start_gateway(
        {**_patient(harness), "retention": {**KEEP_EVERYTHING, "uploads_per_minute": 0}}
    )
    staged = 0
    both = asyncio.Event()

    async def wait_for_the_other() -> None:
        nonlocal staged
        staged += 1
        if staged == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 30)

    _staged_then(client, monkeypatch, wait_for_the_other)
    data = b"tonight's backup, sent twice"
    digest = {"Content-Digest": _digest(data)}
    answers = await asyncio.gather(upload(client, data, **digest), upload(client, data, **digest))
    await settled(client)
    present = set(backups_of(harness))
    assert sorted(a[0].status for a in answers) == [200, 201], ([a[1] for a in answers], present)
    assert answers[0][1]["data"] == answers[1][1]["data"]
    assert present == {answers[0][1]["data"]["id"]}


def _digest(data: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"


# --------------------------------------------------------------------------- room


async def test_never_prune_to_make_room(start_gateway: StartGateway, harness: Harness) -> None:
    client = await start_gateway({**harness.storage(), "retention": {"max_bytes_per_system": 100}})
    resp, body = await upload(client, b"x" * 60)
    assert resp.status == 201
    kept = body["data"]["id"]
    resp, body = await upload(client, b"y" * 50)  # 60 + 50 kept > 100
    assert (resp.status, body["message"]) == (413, "system backup quota exceeded")
    await settled(client)
    assert backups_of(harness) == [kept]


async def test_two_uploads_never_pass_on_one_room(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway(
        {**harness.storage(), "retention": {"max_bytes_per_system": 1000, "uploads_per_minute": 0}}
    )
    answers = await asyncio.gather(*(upload(client, b"z" * 600) for _ in range(2)))
    statuses = sorted(a[0].status for a in answers)
    assert statuses == [201, 413]
    winner = next(a[1]["data"]["id"] for a in answers if a[0].status == 201)
    await settled(client)
    assert backups_of(harness) == [winner]


async def test_the_organization_quota_holds_under_concurrency(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway(
        {
            **_patient(harness),
            "retention": {
                "max_bytes_per_organization": 10_000,
                "uploads_per_minute": 0,
                "keep_last": 20,
            },
        }
    )
    answers = await asyncio.gather(*(upload(client, b"q" * 3_000) for _ in range(12)))
    assert sorted(a[0].status for a in answers) == [201] * 3 + [413] * 9
    refused = {a[1]["message"] for a in answers if a[0].status == 413}
    assert refused == {"organization backup quota exceeded"}
    await settled(client)
    assert len(backups_of(harness)) == 3


# --------------------------------------------------------------------------- processes


class Workers:
    """`serve --workers N` on local disk, without Redis unless given."""

    def __init__(self, tmp_path: Path, retention: dict[str, Any], workers: int = 2, **extra: Any):
        self.harness = LocalHarness(tmp_path / "backups")
        self.port = free_port()
        storage = {**self.harness.storage(), "retention": retention}
        config = write_config(tmp_path, self.port, storage, **extra)
        self.proc = serve_gateway(config, "--workers", str(workers))
        self.output = OutputWatcher(self.proc)
        self.output.wait_for(
            lambda rs: sum(r["msg"].startswith("listening on") for r in rs) == workers
        )
        wait_for_port(self.port, proc=self.proc)

    def upload(self, data: bytes) -> tuple[int, dict[str, Any]]:
        return appliance_upload(self.port, data)

    def upload_at_once(self, bodies: list[bytes]) -> list[tuple[int, dict[str, Any]]]:
        answers: list[Any] = [None] * len(bodies)
        start = threading.Barrier(len(bodies))

        def one(i: int) -> None:
            start.wait()
            answers[i] = self.upload(bodies[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return answers

    def pruned(self, count: int) -> None:
        self.output.wait_for(
            lambda rs: (
                sum(r["msg"] == "backup prune" and r.get("outcome") == "backup pruned" for r in rs)
                >= count
            )
        )

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        out = self.output.wait_closed()
        assert self.proc.returncode == 0, out
        return out


def test_two_workers_without_redis_keep_the_newest(tmp_path: Path) -> None:
    """Before: two workers, no Redis, eight uploads of one system answered 201 → 0 left."""
    gateway = Workers(tmp_path, {"keep_last": 3, "uploads_per_minute": 0, **ONLY_LAST})
    try:
        answers = gateway.upload_at_once([b"w" * 2000] * 8)
        assert [a[0] for a in answers] == [201] * 8, answers
        gateway.pruned(5)
        ids = sorted(a[1]["data"]["id"] for a in answers)
        assert backups_of(gateway.harness) == ids[-3:]
    finally:
        gateway.stop()


def test_two_workers_without_redis_never_pass_on_one_room(tmp_path: Path) -> None:
    """Before: two 600-byte uploads under a 1,000-byte cap → 0 left."""
    gateway = Workers(tmp_path, {"max_bytes_per_system": 1000, "uploads_per_minute": 0})
    try:
        for _ in range(3):  # one race can fall either way: each must keep exactly one
            answers = gateway.upload_at_once([b"r" * 600] * 2)
            statuses = sorted(a[0] for a in answers)
            left = backups_of(gateway.harness)
            assert len(left) == 1, (answers, left)
            if statuses == [201, 413]:
                winner = next(a[1]["data"]["id"] for a in answers if a[0] == 201)
                assert left == [winner]
            else:  # both refused: the one kept from an earlier round holds the room
                assert statuses == [413, 413]
    finally:
        gateway.stop()


def test_a_stale_redis_lock_does_not_hold_up_the_answer(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Before: a stale retention lock delayed 201s by 10, 20 and 30 s. The commit waits for
    the lock a few seconds at most; the prune behind the lock is counted and left to the
    next run, and the backup is there."""
    for key in redis_server.client(1).keys("backup:*"):
        redis_server.client(1).delete(key)
    gateway = Workers(
        tmp_path,
        {"keep_last": 1, "uploads_per_minute": 0, **ONLY_LAST, "prune_seconds": 1},
        workers=1,
        redis={"url": redis_server.url},
    )
    try:
        assert gateway.upload(b"first")[0] == 201
        redis_server.client(1).set(f"backup:retention:{KEY}", "a-dead-process", px=600_000)
        status, body = gateway.upload(b"second")
        assert status == 201, body
        assert body["data"]["id"] in backups_of(gateway.harness)
        gateway.output.wait_for(
            lambda rs: (
                any("retention of KEY-C1" in r["msg"] for r in rs)
                or any(r.get("outcome") == "busy" for r in rs)
                or any("busy" in r["msg"] for r in rs)
            )
        )
    finally:
        redis_server.client(1).delete(f"backup:retention:{KEY}")
        gateway.stop()


def test_the_sweep_prunes_what_no_run_after_an_upload_did(tmp_path: Path) -> None:
    """Backups beyond the rules, left by a run that never happened, go at start-up."""
    harness = LocalHarness(tmp_path / "backups")
    now = datetime.now(UTC)
    planted = sorted(id_at(now - timedelta(minutes=m)) for m in range(1, 7))
    for backup_id in planted:
        harness.put(location_for("org_c1", backup_id))
    gateway = Workers(tmp_path, {"keep_last": 2, **ONLY_LAST}, workers=1)
    try:
        gateway.pruned(4)
        gateway.output.wait_for(lambda rs: any(r["msg"] == "retention sweep done" for r in rs))
        assert backups_of(harness) == planted[-2:]
    finally:
        gateway.stop()


def test_a_config_with_the_old_count_cap_is_refused(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, free_port(), {"backend": "local", "retention": {"max_backups_per_system": 10}}
    )
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "storage.retention.max_backups_per_system" in lines[0]
    assert "keep_last" in lines[0]


@pytest.mark.parametrize("workers", [2])
def test_s3_without_redis_runs_one_process(tmp_path: Path, workers: int) -> None:
    storage = {"backend": "s3", "s3": {"bucket": "b", "endpoint_url": "http://127.0.0.1:1"}}
    config = write_config(tmp_path, free_port(), storage, server={"workers": workers})
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "server.workers" in done.stderr and "redis" in done.stderr.lower()


async def test_prunes_drop_the_usage_counter(
    start_gateway: StartGateway, tmp_path: Path, redis_server: RedisServer
) -> None:
    harness = LocalHarness(tmp_path / "backups")
    storage = {
        **harness.storage(),
        "usage_counter": {"enabled": True},
        "retention": {"keep_last": 1, **ONLY_LAST, "uploads_per_minute": 0},
    }
    client = await start_gateway(storage, redis={"url": redis_server.url})
    usage = redis_server.client(1)
    assert (await upload(client, b"x"))[0].status == 201
    await settled(client)
    usage.set("backup:org_usage:org_c1", "123")
    assert (await upload(client, b"y"))[0].status == 201  # stores one, prunes one
    await settled(client)
    await eventually(lambda: not usage.exists("backup:org_usage:org_c1"), "the drops")
    assert len(backups_of(harness)) == 1
    assert not usage.exists(f"backup:retention:{KEY}")  # released


async def test_an_upload_hands_its_commit_lock_to_its_pruning_run(
    start_gateway: StartGateway, tmp_path: Path, redis: RedisServer
) -> None:
    """The run after an upload decides from the listing its commit's check took under the
    system's lock, held from that check to its last prune: Redis sees the lock taken once
    for both (twice before: the run listed the folder again under a lock of its own), and
    let go at the end."""
    harness = LocalHarness(tmp_path / "backups")
    older = id_at(datetime.now(UTC) - timedelta(hours=1))
    harness.put(location_for("org_c1", older))
    retention = {"keep_last": 1, **ONLY_LAST, "uploads_per_minute": 0}
    client = await start_gateway(
        {**harness.storage(), "retention": retention}, redis={"url": redis.url}
    )
    watcher = redis.client(1)
    watcher.config_set("notify-keyspace-events", "Kg$")  # SET, PEXPIRE, DEL of a key
    events = watcher.pubsub()
    events.subscribe(f"__keyspace@1__:backup:retention:{KEY}")
    try:
        # subscribed once Redis says so (get_message answers None for an ignored message)
        assert events.get_message(timeout=10.0)["type"] == "subscribe"
        resp, body = await upload(client, b"new")
        assert resp.status == 201, body
        await settled(client)
        seen = []
        # every event was published before the command that made it answered the gateway
        while (message := events.get_message(timeout=1.0)) is not None:
            seen.append(message["data"].decode())
    finally:
        events.close()
        watcher.config_set("notify-keyspace-events", "")
    assert backups_of(harness) == [body["data"]["id"]]  # the older one pruned
    assert seen.count("set") == 1 and seen[-1] == "del", seen
    assert not watcher.exists(f"backup:retention:{KEY}")
