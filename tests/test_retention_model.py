"""Retention (DESIGN.md §11) on a real gateway against a small reference model, with hypothesis.

Each example builds a gateway of its own on a loopback port over real storage (local disk,
S3 on moto), with a random history already in the system's folder (ids at random times
over the last 400 days, some protected through the route or the sidecar) and a random keep
policy, then plays rounds. A round runs at once (one `asyncio.gather`): 1..6 uploads of
random kinds (plain, with a digest, a wrong digest, empty, too large, a retry of an
earlier upload), 0..2 sweeps of the running app's retention, and protection changes.

After the round settles (every answer in, the runs after the uploads done) storage is
compared with the model: the rules of §11 (the reference of test_keep_rules.py) over the
history and every upload answered 201:

- nothing is present that was never answered 201 nor planted (refusals store nothing);
- every backup the rules keep, or that is protected, is present: no backup answered 201
  is lost while the rules keep it, a protected one never goes;
- after a round whose runs saw everything (an upload answered 201, and no protection
  taken away during it), and after a sweep in any case, present == kept exactly;
- each answer is one the model allows (a 404 to a protection change only for a backup
  the rules let go; a 413 `system backup quota exceeded` only when the room could be
  short; a retry is 200 with its earlier backup while that one stays);
- the bytes of every backup present are those planted or uploaded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from gateway import create_app
from gateway.backups.keep_rules import Candidate, KeepPolicy
from gateway.backups.retention import RETENTION

from .conftest import Harness
from .support import (
    DIRECTORY,
    KEEP_EVERYTHING,
    LocalHarness,
    MotoServer,
    S3Harness,
    location_for,
    make_config,
)
from .test_keep_rules import reference
from .test_protection import protect
from .test_retention import id_at
from .test_uploads import backups_of, upload

ORG = "org_c1"
MAX_UPLOAD = 1000  # storage.retention.max_upload_bytes: larger ones are 413 backup too large
SYSTEM_FULL = "system backup quota exceeded"
UNSETTLED = ("failed", "timeout", "lost_lock", "busy")  # runs that left work for later
BUSY = (503, "backup busy, retry later")  # a protection change that waited 5 s for the lock

# --------------------------------------------------------------------------- the model


def kept(ids: set[str], protected: set[str], policy: KeepPolicy) -> set[str]:
    """What §11 keeps of `ids`: everything with every rule off, else what a rule picks or
    protection holds (the reference written from the text)."""
    if not policy.prunes:
        return set(ids)
    reasons = reference([Candidate(b, protected=b in protected) for b in ids], policy)
    return {b for b, why in reasons.items() if why}


def digest_header(data: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Planted:
    minutes_ago: int
    size: int
    suffix: str
    protection: str  # "", "route" or "sidecar" (local disk only; S3 takes the route)


@dataclass(frozen=True)
class Send:
    kind: str  # plain, digest, bad_digest, empty, too_large, retry
    size: int
    pick: int  # a retry: which earlier upload answered 201


@dataclass(frozen=True)
class Round:
    sends: list[Send]
    sweeps: int
    protections: list[tuple[int, bool]]  # (which backup alive at the round's start, flag)


@dataclass(frozen=True)
class Scenario:
    history: list[Planted]
    policy: KeepPolicy
    cap: int  # max_bytes_per_system, 0 = none
    max_protected: int
    background_sweeps: bool  # sweep_seconds tiny: sweeps also run on their own all along
    rounds: list[Round]


planted = st.builds(
    Planted,
    minutes_ago=st.integers(1, 400 * 24 * 60),
    size=st.integers(1, 400),
    suffix=st.sampled_from([".tar.gz", ".bin", ".gpg"]),
    protection=st.sampled_from(["", "", "", "", "route", "sidecar"]),
)
sends = st.builds(
    Send,
    kind=st.sampled_from(["plain", "plain", "digest", "digest", "bad_digest", "empty"])
    | st.sampled_from(["too_large", "retry", "retry"]),
    size=st.integers(16, MAX_UPLOAD),
    pick=st.integers(0, 1000),
)
rounds = st.builds(
    Round,
    sends=st.lists(sends, min_size=1, max_size=6),
    sweeps=st.integers(0, 2),
    protections=st.lists(st.tuples(st.integers(0, 1000), st.booleans()), max_size=2),
)
policies = st.builds(
    KeepPolicy,
    last=st.integers(0, 4),
    daily=st.integers(0, 8),
    weekly=st.integers(0, 5),
    monthly=st.integers(0, 8),
) | st.just(KeepPolicy(0, 0, 0, 0))
scenarios = st.builds(
    Scenario,
    history=st.lists(planted, max_size=24),
    policy=policies,
    cap=st.sampled_from([0, 0, 0]) | st.integers(1200, 8000),
    max_protected=st.integers(1, 4),
    background_sweeps=st.booleans(),
    rounds=st.lists(rounds, min_size=1, max_size=5),
)


# --------------------------------------------------------------------------- storage


@dataclass
class Example:
    """One example's storage and the folder for its config and directory."""

    harness: Harness
    folder: Path
    cleanup: Callable[[], None]


NewExample = Callable[[], Example]


@pytest.fixture(params=["local", "local_inline", "s3_moto"])
def new_example(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NewExample]:
    """Fresh storage for each example (hypothesis runs many in one test): its own folder on
    local disk (in each io mode), its own bucket on the shared moto server."""
    numbers = itertools.count()
    kind = request.param
    moto: MotoServer | None = request.getfixturevalue("moto_server") if kind == "s3_moto" else None

    def make() -> Example:
        folder = tmp_path / f"example-{next(numbers)}"
        folder.mkdir()
        (folder / "directory.yaml").write_text(yaml.safe_dump(DIRECTORY))
        harness: Harness
        if moto is not None:
            harness = S3Harness(moto.endpoint, f"model-{uuid.uuid4().hex[:12]}")
        else:
            io = "inline" if kind == "local_inline" else "process"
            harness = LocalHarness(folder / "backups", io=io)
        return Example(harness, folder, lambda: shutil.rmtree(folder, ignore_errors=True))

    yield make


def read_stored(harness: Harness, backup_id: str) -> bytes:
    location = location_for(ORG, backup_id)
    if isinstance(harness, LocalHarness):
        return (harness.root / location.relative_key).read_bytes()
    answer = harness.client.get_object(
        Bucket=harness.bucket, Key=harness.prefix + location.relative_key
    )
    data: bytes = answer["Body"].read()
    return data


def plant(harness: Harness, backup_id: str, data: bytes, sidecar_protected: bool) -> None:
    location = location_for(ORG, backup_id)
    harness.put_backup(location, data, "backup.tar.gz")
    if sidecar_protected:
        assert isinstance(harness, LocalHarness)
        sidecar = harness.root / (location.relative_key + ".meta.json")
        meta = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**meta, "protected": True}))


def storage_section(harness: Harness, retention: dict[str, Any]) -> dict[str, Any]:
    """Storage given time on a busy host (CI runs this beside other tests and benchmarks):
    the model knows the answers of a store that answers, not of one that timed out."""
    if isinstance(harness, S3Harness):  # a handful of requests at once
        storage = harness.storage(
            read_timeout_seconds=10, connect_timeout_seconds=5, max_attempts=3
        )
    else:
        storage = harness.storage()
    return {**storage, "operation_timeout_seconds": 30, "retention": retention}


async def started(example: Example, retention: dict[str, Any]) -> TestClient:
    config = make_config(example.folder, storage_section(example.harness, retention))
    client = TestClient(TestServer(create_app(config), host="127.0.0.1"))
    await client.start_server()
    return client


# --------------------------------------------------------------------------- one example


@dataclass
class Model:
    policy: KeepPolicy
    alive: set[str]  # what the rules (and protection) have let stay so far
    protected: set[str]
    content: dict[str, bytes] = field(default_factory=dict)  # every id ever stored
    uploaded: list[str] = field(default_factory=list)  # ids answered 201, in order

    def kept(self, ids: set[str], protected: set[str] | None = None) -> set[str]:
        return kept(ids, self.protected if protected is None else protected, self.policy)

    def kept_bytes(self, ids: set[str]) -> int:
        return sum(len(self.content[b]) for b in ids)


async def play(example: Example, scenario: Scenario) -> None:
    harness = example.harness
    note(repr(scenario))
    now = datetime.now(UTC)
    model = Model(scenario.policy, set(), set())
    by_route: list[str] = []
    for n, p in enumerate(scenario.history):
        backup_id = id_at(now - timedelta(minutes=p.minutes_ago), p.suffix)
        data = f"history {n} {backup_id} ".encode().ljust(p.size, b"h")
        protected = bool(p.protection) and len(model.protected) < scenario.max_protected
        sidecar = protected and p.protection == "sidecar" and isinstance(harness, LocalHarness)
        plant(harness, backup_id, data, sidecar)
        model.alive.add(backup_id)
        model.content[backup_id] = data
        if protected:
            model.protected.add(backup_id)
            if not sidecar:
                by_route.append(backup_id)
    if by_route:  # protected before the gateway under test starts (and sweeps) at all
        # with every keep rule off: this gateway's own start-up sweep prunes nothing (with
        # the default rules it pruned planted backups that the policy under test keeps)
        setup = await started(example, {**KEEP_EVERYTHING, "max_protected_per_system": 0})
        try:
            for backup_id in by_route:
                assert (await protect(setup, backup_id))[0] == 200
        finally:
            await setup.close()

    policy = scenario.policy
    client = await started(
        example,
        {
            "keep_last": policy.last,
            "keep_daily": policy.daily,
            "keep_weekly": policy.weekly,
            "keep_monthly": policy.monthly,
            "max_upload_bytes": MAX_UPLOAD,
            "max_bytes_per_system": scenario.cap,
            "max_protected_per_system": scenario.max_protected,
            "uploads_per_minute": 0,
            "uploads_per_hour": 0,
            "sweep_seconds": 0.05 if scenario.background_sweeps else 3600,
        },
    )
    try:
        for number, round_ in enumerate(scenario.rounds):
            await play_round(client, harness, scenario, model, round_, number)
        for backup_id in backups_of(harness):
            assert read_stored(harness, backup_id) == model.content[backup_id], backup_id
    finally:
        await client.close()


async def play_round(
    client: TestClient,
    harness: Harness,
    scenario: Scenario,
    model: Model,
    round_: Round,
    number: int,
) -> None:
    retention = client.app[RETENTION]
    alive_start = sorted(model.alive)
    protected_start = set(model.protected)

    # what each upload sends
    bodies: list[tuple[Send, bytes, dict[str, str], str | None]] = []
    for i, send in enumerate(round_.sends):
        kind, headers, retry_of = send.kind, {}, None
        if kind == "retry" and not model.uploaded:
            kind = "digest"  # nothing to retry yet
        if kind == "retry":
            retry_of = model.uploaded[send.pick % len(model.uploaded)]
            data = model.content[retry_of]
        elif kind == "empty":
            data = b""
        elif kind == "too_large":
            data = f"upload {number}.{i} ".encode().ljust(MAX_UPLOAD + 1 + send.size % 100, b"L")
        else:
            data = f"upload {number}.{i} ".encode().ljust(send.size, b"u")
        if kind in ("digest", "retry"):
            headers["Content-Digest"] = digest_header(data)
        elif kind == "bad_digest":
            headers["Content-Digest"] = digest_header(data + b"!")
        bodies.append((Send(kind, send.size, send.pick), data, headers, retry_of))
    targets: dict[str, bool] = {}
    for pick, flag in round_.protections:
        if alive_start:
            targets.setdefault(alive_start[pick % len(alive_start)], flag)
    # the most the round may find kept before its uploads: a protection of this round may
    # land before an upload's look at its room (a busy machine orders them either way)
    protected_at_most = protected_start | {b for b, flag in targets.items() if flag}
    kept_start_bytes = model.kept_bytes(model.kept(model.alive, protected_at_most))

    async def protection(backup_id: str, flag: bool) -> tuple[int, dict[str, Any]]:
        return await protect(client, backup_id, flag)

    jobs: list[Any] = [upload(client, data, **headers) for _, data, headers, _ in bodies]
    jobs += [retention.sweep() for _ in range(round_.sweeps)]
    jobs += [protection(backup_id, flag) for backup_id, flag in targets.items()]
    answers = await asyncio.gather(*jobs)
    await retention.settled()
    upload_answers = answers[: len(bodies)]
    sweep_outcomes = answers[len(bodies) : len(bodies) + round_.sweeps]
    protection_answers = dict(zip(targets, answers[len(bodies) + round_.sweeps :], strict=True))
    note(f"round {number}: {len(model.alive)} alive, {sorted(protected_start)} protected")
    for (send, data, _, retry_of), (resp, body) in zip(bodies, upload_answers, strict=True):
        found = (body.get("data") or {}).get("id")
        note(
            f"  {send.kind} {len(data)} B{f' of {retry_of}' if retry_of else ''}: "
            f"{resp.status} {body['message']} {found or ''}"
        )
    for backup_id, answer in zip(targets, answers[len(bodies) + round_.sweeps :], strict=True):
        note(f"  protect {backup_id} {targets[backup_id]}: {answer[0]} {answer[1]['message']}")
    note(f"  sweeps: {sweep_outcomes}")
    for outcomes in sweep_outcomes:
        assert not set(outcomes) & {"failed", "timeout", "lost_lock"}, outcomes

    # the 201s, then the model's kept set, the answers checked against it
    stored_now: set[str] = set()
    for (_, data, _, _), (resp, body) in zip(bodies, upload_answers, strict=True):
        if resp.status == 201:
            backup_id = body["data"]["id"]
            assert body["data"]["size"] == len(data), body
            assert body["data"]["sha256"] == hashlib.sha256(data).hexdigest(), body
            assert backup_id.endswith(".tar.gz") and backup_id[:36] not in model.content
            stored_now.add(backup_id)
            model.content[backup_id] = data
            model.uploaded.append(backup_id)
    everything = model.alive | stored_now
    rules_keep = model.kept(everything, set())
    protected_end = set(protected_start)
    took_away = False
    for backup_id, flag in targets.items():
        status, body = protection_answers[backup_id]
        if status == 200:
            assert body["data"]["protected"] is flag, body
            if flag:
                protected_end.add(backup_id)
            else:
                took_away = took_away or backup_id in protected_start
                protected_end.discard(backup_id)
    protects_won = {
        b for b, flag in targets.items() if flag and protection_answers[b][0] == 200
    } - protected_start
    for backup_id, flag in targets.items():
        status, body = protection_answers[backup_id]
        if status == 404:  # pruned before the change reached it: never one the rules keep
            assert backup_id not in protected_start and backup_id not in rules_keep, backup_id
        elif status == 409:
            assert (flag, body["message"]) == (True, "too many protected backups"), body
            assert backup_id not in protected_start
            assert len(protected_start) + len(protects_won) >= scenario.max_protected
        elif (status, body["message"]) == BUSY:
            pass  # nothing changed
        else:
            assert status == 200, (status, body)
    assert len(protected_end) <= scenario.max_protected
    expected = model.kept(everything, protected_end)
    present = set(backups_of(harness))

    for (send, data, _, retry_of), (resp, body) in zip(bodies, upload_answers, strict=True):
        answer = (resp.status, body["message"])
        if send.kind == "empty":
            assert answer == (400, "empty upload")
        elif send.kind == "too_large":
            assert answer == (413, "backup too large")
        elif answer == (413, SYSTEM_FULL):
            # never while the room was certain: what was kept plus every byte sent now fits
            sizes = sum(len(d) for s, d, _, _ in bodies if s.kind not in ("empty", "too_large"))
            assert scenario.cap and kept_start_bytes + sizes > scenario.cap, (answer, sizes)
        elif send.kind == "bad_digest":
            assert answer == (400, "checksum mismatch")
        elif send.kind == "retry" and resp.status == 200:
            assert answer == (200, "backup already stored")
            assert body["data"]["id"] in model.content
            assert model.content[body["data"]["id"]] == data
        elif send.kind == "retry":
            assert resp.status == 201, body
            # a new backup only when the earlier one went meanwhile
            assert retry_of not in present, (retry_of, body)
        else:
            assert resp.status == 201, body

    # nothing refused is stored, nothing pruned comes back
    assert present <= everything, sorted(present - everything)
    # every backup the rules keep, and every protected one, is there
    assert expected <= present, ("lost", sorted(expected - present))
    # a run after an upload lists everything committed before it: then nothing unkept stays
    if stored_now and not took_away:
        assert present == expected, ("not pruned", sorted(present - expected))
        if scenario.cap and not targets:
            assert model.kept_bytes(expected) <= scenario.cap
    for backup_id in stored_now & present:
        assert read_stored(harness, backup_id) == model.content[backup_id]

    # a sweep leaves exactly what the rules keep
    outcomes = await retention.sweep()
    assert not set(outcomes) & set(UNSETTLED), outcomes
    present = set(backups_of(harness))
    assert present == expected, (
        ("lost", sorted(expected - present)),
        ("not pruned", sorted(present - expected)),
    )
    model.alive, model.protected = expected, protected_end


# CI runs the three backends in 20-40 s on a 2-core host, busy or not: few examples, the
# same ones every run (derandomize, no example database), and no shrinking, so a failure
# reports its example (the notes: the scenario, each round's answers) at once. Locally,
# RETENTION_MODEL_EXAMPLES=200 explores further (still derandomized: the same 200 each run).
@settings(
    max_examples=int(os.environ.get("RETENTION_MODEL_EXAMPLES", "10")),
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios)
def test_retention_matches_the_model(new_example: NewExample, scenario: Scenario) -> None:
    example = new_example()
    try:
        asyncio.run(play(example, scenario))
    finally:
        example.cleanup()
