"""What only the S3 backend promises: final deletes on versioned buckets, the prefix, and every
storage failure a bounded 502 — against real S3 servers over HTTP with real signing.

Every test taking `s3_server` runs twice: on moto's standalone server and on SeaweedFS (a
real S3 implementation). Where they differ:

- wrong credentials: SeaweedFS checks signatures against its identities file from the
  start; moto only after INITIAL_NO_AUTH_ACTION_COUNT requests, so that test starts a moto
  of its own with the count at 0 — both are tested;
- a frozen server (SIGSTOP) runs on a private moto only: stopping the shared SeaweedFS
  would stall every other S3 test for as long;
- SeaweedFS keeps idle connections alive where moto closes them, which the fault proxy's
  "drop" must cover (it swallows requests on kept-alive connections too).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

import pytest
from aiohttp import web

from gateway.backups.storage import STORE

from .conftest import S3Server, StartGateway
from .support import (
    KEEP_EVERYTHING,
    MotoServer,
    S3Harness,
    eventually,
    free_port,
    location_for,
    new_backup_id,
    s3_settings,
    storage_scanned,
)
from .support import (
    delete_as as delete,
)


async def assert_bad_gateway(resp: Any, *secrets: str) -> None:
    assert resp.status == 502
    text = await resp.text()
    assert await resp.json() == {
        "code": 502,
        "message": "failed to delete backup",
        "data": {"type": "external_api_error", "errors": []},
    }
    for secret in secrets:
        assert secret not in text


def versioned_harness(s3_server: S3Server) -> S3Harness:
    return S3Harness(s3_server.endpoint, f"ver-{uuid.uuid4().hex[:12]}", versioned=True)


@pytest.mark.parametrize("mode", ["auto", "on"])
async def test_versioned_bucket_delete_removes_every_version(
    start_gateway: StartGateway, s3_server: S3Server, mode: str
) -> None:
    h = versioned_harness(s3_server)
    client = await start_gateway(h.storage(versioning=mode))
    bid = new_backup_id()
    target = location_for("org_c1", bid)
    for n in range(3):
        h.put(target, data=f"v{n}".encode())
    # an older delete marker in the middle of the history, then a new current version
    h.client.delete_object(Bucket=h.bucket, Key=target.relative_key)
    h.put(target, data=b"v3")
    neighbours = [target.relative_key + ".meta.json", target.relative_key + "2"]
    for key in neighbours:
        h.put_key(key, b"a")
        h.put_key(key, b"b")
    assert len(h.versions(target.relative_key)) == 5

    resp = await delete(client, bid)

    assert resp.status == 200
    assert h.versions(target.relative_key) == []
    for key in neighbours:
        assert len(h.versions(key)) == 2


async def test_versioned_bucket_hidden_backup_is_404_and_history_kept(
    start_gateway: StartGateway, s3_server: S3Server
) -> None:
    h = versioned_harness(s3_server)
    client = await start_gateway(h.storage())
    bid = new_backup_id()
    target = location_for("org_c1", bid)
    h.put(target)
    h.client.delete_object(Bucket=h.bucket, Key=target.relative_key)  # latest: a delete marker
    resp = await delete(client, bid)
    assert resp.status == 404
    assert len(h.versions(target.relative_key)) == 2


async def test_suspended_versioning_still_deletes_old_versions(
    start_gateway: StartGateway, s3_server: S3Server
) -> None:
    h = versioned_harness(s3_server)
    bid = new_backup_id()
    target = location_for("org_c1", bid)
    h.put(target, b"old")
    h.client.put_bucket_versioning(Bucket=h.bucket, VersioningConfiguration={"Status": "Suspended"})
    h.put(target, b"new")
    client = await start_gateway(h.storage())
    assert (await delete(client, bid)).status == 200
    assert h.versions(target.relative_key) == []


async def test_versioning_off_on_a_versioned_bucket_leaves_a_marker(
    start_gateway: StartGateway, s3_server: S3Server
) -> None:
    # versioning: off trusts the operator; documented, and shown here so it is a choice.
    h = versioned_harness(s3_server)
    client = await start_gateway(h.storage(versioning="off"))
    bid = new_backup_id()
    h.put(location_for("org_c1", bid))
    assert (await delete(client, bid)).status == 200
    assert not h.exists(location_for("org_c1", bid))
    assert len(h.versions(location_for("org_c1", bid).relative_key)) == 2


async def test_a_versioned_delete_cut_off_part_way_never_serves_an_older_write(
    start_gateway: StartGateway, s3_server: S3Server
) -> None:
    """The current version is deleted last, in a call of its own: cut off before it, the key
    still serves its latest write (hostile input round 2, 17)."""
    from .faultproxy import FaultProxy

    h = versioned_harness(s3_server)
    bid = new_backup_id()
    loc = location_for("org_c1", bid)
    for body in (b"first", b"second", b"latest"):
        h.put(loc, body)
    proxy = FaultProxy("127.0.0.1", int(s3_server.port))
    await proxy.start()
    try:
        settings = s3_settings(proxy.endpoint, h.bucket, versioning="on", max_attempts=1)
        client = await start_gateway(
            {
                "backend": "s3",
                "operation_timeout_seconds": 2,
                "s3": settings,
                "retention": KEEP_EVERYTHING,  # no start-up sweep among the counted requests
            }
        )
        # The delete's HeadObject and its look at the backup's marks (ListObjectsV2),
        # ListObjectVersions and the older versions' DeleteObjects pass; the last call, for
        # the current version, never reaches the server.
        await storage_scanned(client)  # its listing goes through the proxy too
        proxy.faults.swallow_requests_after = proxy.faults.requests + 4
        resp = await delete(client, bid)
        assert resp.status == 502
    finally:
        await proxy.close()
    current = h.client.get_object(Bucket=h.bucket, Key=loc.relative_key)["Body"].read()
    assert current == b"latest"
    assert len(h.versions(loc.relative_key)) == 1  # the older ones are gone


@pytest.mark.parametrize("prefix", ["tenant-a/", "tenant-b-", ""])
async def test_prefix_is_joined_exactly_as_written(
    start_gateway: StartGateway, s3_server: S3Server, prefix: str
) -> None:
    h = S3Harness(s3_server.endpoint, f"pfx-{uuid.uuid4().hex[:12]}", prefix=prefix)
    client = await start_gateway(h.storage())
    bid = new_backup_id()
    loc = location_for("org_c1", bid)
    h.put(loc)
    # the same relative key without the prefix must survive
    h.client.put_object(Bucket=h.bucket, Key="x" + loc.relative_key, Body=b"n")
    assert (await delete(client, bid)).status == 200
    raw = {o["Key"] for o in h.client.list_objects_v2(Bucket=h.bucket).get("Contents", [])}
    assert raw == {"x" + loc.relative_key}


async def test_one_client_per_process(start_gateway: StartGateway, s3_harness: S3Harness) -> None:
    client = await start_gateway(s3_harness.storage())
    store = client.app[STORE]
    first = store._client
    for _ in range(3):
        bid = new_backup_id()
        s3_harness.put(location_for("org_c1", bid))
        assert (await delete(client, bid)).status == 200
    assert store._client is first
    await client.close()
    assert store._client is None


# ---- failures: every one a bounded 502 with nothing leaked


async def test_missing_bucket_is_502_not_404(
    start_gateway: StartGateway, s3_server: S3Server
) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    client = await start_gateway({"backend": "s3", "s3": s3_settings(s3_server.endpoint, bucket)})
    await assert_bad_gateway(await delete(client, new_backup_id()), bucket, "127.0.0.1")
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert bucket not in await ready.text()


async def test_missing_versioned_lookup_bucket_is_502(
    start_gateway: StartGateway, s3_server: S3Server
) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    client = await start_gateway(
        {"backend": "s3", "s3": s3_settings(s3_server.endpoint, bucket, versioning="on")}
    )
    await assert_bad_gateway(await delete(client, new_backup_id()), bucket)


async def test_wrong_credentials_are_502(start_gateway: StartGateway) -> None:
    # A second S3 server that enforces signatures against its own (empty) key store.
    server = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        client = await start_gateway(
            {
                "backend": "s3",
                "s3": s3_settings(
                    server.endpoint,
                    "bucket",
                    access_key_id="AKIAWRONG",
                    secret_access_key="wrong-secret",
                ),
            }
        )
        await assert_bad_gateway(await delete(client, new_backup_id()), "AKIAWRONG", "wrong-secret")
    finally:
        server.stop()


async def test_wrong_credentials_are_502_on_seaweedfs(
    start_gateway: StartGateway, seaweed_server: Any
) -> None:
    harness = S3Harness(seaweed_server.endpoint, f"cred-{uuid.uuid4().hex[:12]}")
    bid = new_backup_id()
    harness.put(location_for("org_c1", bid))
    settings = s3_settings(
        seaweed_server.endpoint, harness.bucket, secret_access_key="wrong-secret"
    )
    client = await start_gateway({"backend": "s3", "s3": settings})
    await assert_bad_gateway(await delete(client, bid), "wrong-secret", harness.bucket)
    assert harness.exists(location_for("org_c1", bid))


async def test_connection_refused_is_prompt_502(start_gateway: StartGateway) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    client = await start_gateway({"backend": "s3", "s3": s3_settings(endpoint, "bucket")})
    started = time.monotonic()
    await assert_bad_gateway(await delete(client, new_backup_id()), "127.0.0.1")
    assert time.monotonic() - started < 10
    assert (await client.get("/readyz")).status == 503


@pytest.fixture
async def misbehaving_s3(aiohttp_server: Any) -> Any:
    """A real HTTP endpoint that answers every S3 request with a chosen error."""
    state: dict[str, Any] = {"status": 503, "code": "SlowDown", "requests": 0}

    async def answer(request: web.Request) -> web.Response:
        state["requests"] += 1
        body = (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{state['code']}</Code>"
            f"<Message>internal detail bucket-secret-name</Message></Error>"
        )
        return web.Response(status=state["status"], text=body, content_type="application/xml")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = await aiohttp_server(app)
    state["endpoint"] = str(server.make_url("")).rstrip("/")
    return state


@pytest.mark.parametrize(
    ("status", "code", "attempts"),
    [
        (503, "SlowDown", 2),  # throttling: retried up to max_attempts, then 502
        (500, "InternalError", 2),
        (403, "AccessDenied", 1),  # not retried
    ],
)
async def test_error_answers_are_502_after_bounded_retries(
    start_gateway: StartGateway,
    misbehaving_s3: dict[str, Any],
    status: int,
    code: str,
    attempts: int,
) -> None:
    misbehaving_s3.update(status=status, code=code)
    client = await start_gateway(
        {
            "backend": "s3",
            "s3": s3_settings(
                misbehaving_s3["endpoint"], "bucket-secret-name", versioning="off", max_attempts=2
            ),
            "retention": KEEP_EVERYTHING,  # no start-up sweep among the counted requests
        }
    )
    await storage_scanned(client)  # the start-up scan's failed listing is not counted
    misbehaving_s3["requests"] = 0
    await assert_bad_gateway(await delete(client, new_backup_id()), "bucket-secret-name", code)
    assert misbehaving_s3["requests"] == attempts


async def test_frozen_server_is_bounded_502_then_recovers(
    start_gateway: StartGateway,
) -> None:
    server = MotoServer()
    try:
        h = S3Harness(server.endpoint, "frozen")
        client = await start_gateway(
            {
                "backend": "s3",
                "operation_timeout_seconds": 3,
                "s3": s3_settings(server.endpoint, "frozen", versioning="off"),
            }
        )
        bid = new_backup_id()
        h.put(location_for("org_c1", bid))
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            resp = await delete(client, bid)
            elapsed = time.monotonic() - started
            await assert_bad_gateway(resp, "frozen")
            assert elapsed < 3 + 5, elapsed  # the operation timeout; a loaded machine's margin
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)

        async def answered() -> Any:  # the same process recovers without a restart
            resp = await delete(client, bid)
            return resp if resp.status != 502 else None

        resp = await eventually(answered, "a delete answered once the server thaws")
        assert resp.status in (200, 404)
        assert not h.exists(location_for("org_c1", bid))
    finally:
        server.stop()
