"""S3 with a digest known up front, a small body (DESIGN.md §12, issue #30, 3): the body is
read into memory and hashed, and the commit is one PutObject at the final key with the final
metadata and `x-amz-checksum-sha256` — no staging key, no CopyObject, no multipart upload,
nothing in the store before the commit. A wrong body never reaches the store; a body the
store's own check refuses is the same 400. While the process holds its budget of such
bodies, the next goes up as a multipart upload instead (test_s3_multipart_digest). On moto
and on SeaweedFS (which verifies the checksum; moto does not, so the refused-body case runs
on SeaweedFS alone)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import re
import socket
import uuid

import pytest

from gateway.backups.retention import RETENTION
from storage_backends.s3.uploads import HELD_BODY_BYTES, HELD_BYTES_PER_PROCESS

from .conftest import S3Server, StartGateway
from .faultproxy import FaultProxy, RequestByRequest
from .servers import RedisServer, SeaweedServer
from .support import KEEP_EVERYTHING, S3Harness, eventually, s3_settings, scrape
from .test_digests import digest_of
from .test_s3_commit_outcome import (
    LATE,
    OPERATION_TIMEOUT,
    PATIENT,
    gateway,
    plant_older,
    staging_keys,
)
from .test_s3_multipart_digest import (
    FlipByteIn,
    landed_and_pruned_for,
    open_uploads,
    pruning_and_counting,
)
from .test_uploads import backups_of, envelope_of, head_for, upload

PRUNES = "gateway_retention_prunes_total"
# the commit's PutObject: the one request of a held upload that carries a checksum
HELD_PUT = re.compile(rb"(?im)^x-amz-checksum-sha256:")
# a PutObject (a PUT of a key, no query: not a part, not a copy)
PUT_OBJECT = re.compile(rb"^PUT /[^ ?]+ HTTP/1\.1\r\n")


def sent_since(proxy: FaultProxy, before: dict[bytes, int]) -> dict[bytes, int]:
    """The requests sent through the proxy since `before`, listings (GET: the duplicate
    check's, the fleet scan's) aside."""
    now = proxy.faults.by_method
    return {m: now[m] - before.get(m, 0) for m in now if m != b"GET" and now[m] != before.get(m, 0)}


async def test_a_small_digest_upload_is_one_put_object_at_its_final_key(
    start_gateway: StartGateway, s3_server: S3Server, proxy: FaultProxy
) -> None:
    harness = S3Harness(s3_server.endpoint, f"hld-{uuid.uuid4().hex[:10]}")
    settings = s3_settings(proxy.endpoint, harness.bucket, versioning="off")
    client = await start_gateway({"backend": "s3", "s3": settings, "retention": KEEP_EVERYTHING})
    data = os.urandom(1_000_000)
    sha256 = hashlib.sha256(data)
    before = dict(proxy.faults.by_method)
    resp, body = await upload(
        client, data, filename="nightly.tar.gz", **{"Content-Digest": digest_of(data)}
    )
    assert resp.status == 201, body
    # the bucket check and the PutObject: no create, no completion, no copy, no staging key
    assert sent_since(proxy, before) == {b"HEAD": 1, b"PUT": 1}
    key = f"org_c1/KEY-C1/{body['data']['id']}"
    got = harness.client.get_object(Bucket=harness.bucket, Key=key)
    assert got["Body"].read() == data
    assert got["ContentType"] == "application/gzip"
    assert got["Metadata"]["sha256"] == sha256.hexdigest() == body["data"]["sha256"]
    assert got["Metadata"]["filename"] == "nightly.tar.gz"
    assert got["Metadata"]["uploaded-at"].startswith(body["data"]["uploaded_at"][:19])
    assert backups_of(harness) == [body["data"]["id"]]
    assert staging_keys(harness) == set() and open_uploads(harness) == []
    if isinstance(s3_server, SeaweedServer):
        # the store took the checksum with the object: it checked the bytes against it
        head = harness.client.head_object(Bucket=harness.bucket, Key=key, ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"] == base64.b64encode(sha256.digest()).decode()


async def test_a_wrong_small_body_never_reaches_the_store(
    start_gateway: StartGateway, s3_server: S3Server, proxy: FaultProxy, redis_server: RedisServer
) -> None:
    harness = S3Harness(s3_server.endpoint, f"hlw-{uuid.uuid4().hex[:10]}")
    client, older, usage = await pruning_and_counting(
        start_gateway, harness, proxy.endpoint, redis_server
    )
    before = dict(proxy.faults.by_method)
    data = os.urandom(300_000)
    changed = data[:-1] + bytes([data[-1] ^ 1])  # differs whatever the last byte drew
    resp, body = await upload(client, data, **{"Content-Digest": digest_of(changed)})
    assert (resp.status, body) == (400, {"code": 400, "message": "checksum mismatch", "data": {}})
    assert sent_since(proxy, before).get(b"PUT", 0) == 0  # not a byte of it written
    await client.app[RETENTION].settled()
    assert harness.keys() == {f"org_c1/KEY-C1/{older}"}
    assert usage.get("backup:org_usage:org_c1") == b"123"
    assert await scrape(client, PRUNES) == 0


async def test_a_body_the_store_refuses_is_a_checksum_mismatch(
    start_gateway: StartGateway, seaweed_server: SeaweedServer
) -> None:
    """Bytes changed between the gateway and the store: the store's own check (BadDigest)
    refuses the PutObject and the upload is answered as a mismatch, nothing stored. SeaweedFS
    only: moto does not verify the checksum (it would store the changed bytes)."""
    harness = S3Harness(seaweed_server.endpoint, f"hlr-{uuid.uuid4().hex[:10]}")
    relay = FlipByteIn(int(seaweed_server.port), PUT_OBJECT)
    await relay.start()
    try:
        settings = s3_settings(relay.endpoint, harness.bucket, versioning="off")
        client = await start_gateway(
            {"backend": "s3", "s3": settings, "retention": KEEP_EVERYTHING}
        )
        data = os.urandom(200_000)
        resp, body = await upload(client, data, **{"Content-Digest": digest_of(data)})
        assert (resp.status, body["message"]) == (400, "checksum mismatch")
        assert relay.flipped == 1
        assert harness.keys() == set() and open_uploads(harness) == []
    finally:
        await relay.close()


@pytest.mark.parametrize("digested", [True, False], ids=["digest", "no digest"])
async def test_an_upload_to_a_missing_bucket_is_502_and_never_creates_it(
    start_gateway: StartGateway, s3_server: S3Server, digested: bool
) -> None:
    """SeaweedFS creates a missing bucket on a write: the bucket check before every upload
    keeps the gateway from ever creating one (a wrong bucket name is a 502, not backups
    scattered into a new bucket)."""
    harness = S3Harness(s3_server.endpoint, f"hlm-{uuid.uuid4().hex[:10]}")
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    settings = s3_settings(s3_server.endpoint, missing, versioning="off")
    # nothing that lists the folder before the write (a listing would fail first)
    retention = {**KEEP_EVERYTHING, "max_bytes_per_system": 0, "duplicate_window_seconds": 0}
    client = await start_gateway({"backend": "s3", "s3": settings, "retention": retention})
    data = os.urandom(50_000)
    headers = {"Content-Digest": digest_of(data)} if digested else {}
    resp, body = await upload(client, data, **headers)
    assert (resp.status, body["message"]) == (502, "failed to store backup")
    assert missing not in await resp.text()
    buckets = [b["Name"] for b in harness.client.list_buckets()["Buckets"]]
    assert harness.bucket in buckets and missing not in buckets


# --------------------------------------------------------------------------- the commit


@pytest.mark.parametrize("in_time", [True, False], ids=["in time", "after the answer"])
async def test_a_put_object_answered_late_is_201_or_504_with_its_bookkeeping_done(
    start_gateway: StartGateway, s3_harness: S3Harness, proxy: FaultProxy, in_time: bool
) -> None:
    """The PutObject is the commit: answered within the store's operation time, 201; later,
    504 `upload outcome unknown` — and the backup that landed is pruned for and counted."""
    client = await gateway(
        start_gateway, s3_harness, proxy, PATIENT if in_time else OPERATION_TIMEOUT
    )
    older = plant_older(s3_harness)
    # late: a moment, or until the gateway has answered (then within the PutObject's time)
    proxy.faults.hold_answers = [(HELD_PUT, LATE if in_time else 600.0)]
    data = os.urandom(2 * 1024**2)
    resp, body = await upload(client, data, **{"Content-Digest": digest_of(data)})
    proxy.faults.release_held.set()
    assert proxy.faults.held == 1
    if in_time:
        assert (resp.status, body["message"]) == (201, "backup stored")
    else:
        assert (resp.status, body["message"]) == (504, "upload outcome unknown")
    await landed_and_pruned_for(client, s3_harness, older, data)
    assert staging_keys(s3_harness) == set()


async def test_a_put_object_never_answered_is_504_and_what_landed_is_removed(
    start_gateway: StartGateway, s3_harness: S3Harness, proxy: FaultProxy
) -> None:
    client = await gateway(start_gateway, s3_harness, proxy, read_timeout_seconds=3)
    older = plant_older(s3_harness)
    proxy.faults.hold_answers = [(HELD_PUT, 600.0)]
    data = os.urandom(1024**2)
    resp, body = await upload(client, data, **{"Content-Digest": digest_of(data)})
    assert (resp.status, body["message"]) == (504, "upload outcome unknown")
    await eventually(
        lambda: backups_of(s3_harness) == [older], "the landed backup removed", timeout=30
    )
    assert await scrape(client, PRUNES) == 0


class _StopsReadingPutObject(RequestByRequest):
    """A store that takes a PutObject's head and then reads no more of it, the connection
    left open (a stuck server or proxy). The listening socket's small receive buffer (no
    autotuning once set) keeps the kernel from taking the body in its stead."""

    async def start(self) -> None:
        listening = socket.socket()
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listening.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._handle, sock=listening, limit=4096)
        self.port = listening.getsockname()[1]

    async def head_read(self, head: bytes) -> None:
        if PUT_OBJECT.match(head):
            await asyncio.Event().wait()  # never another byte of it


async def test_a_store_that_stops_reading_the_put_object_ends_the_commit_in_its_time(
    start_gateway: StartGateway, s3_harness: S3Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's read timeout starts only once a body is sent: the commit's PutObject is
    bounded as a whole (the operation time and its answer's), so a stuck store neither
    keeps the held body nor its share of the budget. 504, then the commit given up (its
    log line), nothing stored."""
    relay = _StopsReadingPutObject("127.0.0.1", int(s3_harness.endpoint.rsplit(":", 1)[1]))
    await relay.start()
    try:
        settings = s3_settings(
            relay.endpoint, s3_harness.bucket, versioning="off", read_timeout_seconds=1
        )
        client = await start_gateway(
            {
                "backend": "s3",
                "operation_timeout_seconds": 2.0,
                "s3": settings,
                "retention": KEEP_EVERYTHING,
            }
        )
        data = os.urandom(HELD_BODY_BYTES)
        with caplog.at_level(logging.WARNING, logger="storage_backends.s3.uploads"):
            resp, body = await upload(client, data, **{"Content-Digest": digest_of(data)})
            assert (resp.status, body["message"]) == (504, "upload outcome unknown")
            await eventually(
                lambda: any(
                    "put_object of an upload failed" in r.getMessage() for r in caplog.records
                ),
                "the commit given up",
            )
        assert backups_of(s3_harness) == []
    finally:
        await relay.close()


# --------------------------------------------------------------------------- the budget


async def test_beyond_the_held_budget_an_upload_goes_up_in_parts_and_every_one_lands(
    start_gateway: StartGateway, s3_server: S3Server, proxy: FaultProxy
) -> None:
    """Bodies of the largest held size, half sent, fill the process's budget: none has
    written anything yet (a held body waits for its commit). The next one goes up as a
    multipart upload at once. All complete, every one stored whole; the budget is given back
    (a later small upload is held again)."""
    harness = S3Harness(s3_server.endpoint, f"hlb-{uuid.uuid4().hex[:10]}")
    settings = s3_settings(proxy.endpoint, harness.bucket, versioning="off")
    retention = {
        **KEEP_EVERYTHING,
        "uploads_per_minute": 0,
        "max_bytes_per_system": 0,
        "duplicate_window_seconds": 0,  # no HeadObject of earlier backups: HEADs are the checks
    }
    client = await start_gateway({"backend": "s3", "s3": settings, "retention": retention})
    fits = HELD_BYTES_PER_PROCESS // HELD_BODY_BYTES
    bodies = [os.urandom(HELD_BODY_BYTES) for _ in range(fits + 1)]
    connections = []
    before = dict(proxy.faults.by_method)
    try:
        for n, data in enumerate(bodies):
            reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            digest = f"Content-Digest: {digest_of(data)}"
            writer.write(head_for(len(data), digest, "Connection: close"))
            writer.write(data[: len(data) // 2])
            await writer.drain()
            connections.append((reader, writer))
            # each upload checks the bucket once it has its room, then reads its body
            checks = n + 1

            def checked(checks: int = checks) -> bool:
                return sent_since(proxy, before).get(b"HEAD", 0) >= checks

            await eventually(checked, f"upload {n} under way")
        # the held ones wrote nothing; the last one created its upload and streams its part
        expected = {b"HEAD": fits + 1, b"POST": 1, b"PUT": 1}
        await eventually(lambda: sent_since(proxy, before) == expected, "the last one in parts")
        assert len(open_uploads(harness)) == 1
        for (_, writer), data in zip(connections, bodies, strict=True):
            writer.write(data[len(data) // 2 :])
            await writer.drain()
        answers = [envelope_of(await reader.read()) for reader, _ in connections]
    finally:
        for _, writer in connections:
            writer.close()
    assert [status for status, _ in answers] == [201] * len(bodies)
    for (_, body), data in zip(answers, bodies, strict=True):
        key = f"org_c1/KEY-C1/{body['data']['id']}"
        assert harness.client.get_object(Bucket=harness.bucket, Key=key)["Body"].read() == data
    assert open_uploads(harness) == [] and staging_keys(harness) == set()

    before = dict(proxy.faults.by_method)
    data = os.urandom(1000)
    resp, body = await upload(client, data, **{"Content-Digest": digest_of(data)})
    assert resp.status == 201, body
    assert sent_since(proxy, before) == {b"HEAD": 1, b"PUT": 1}
