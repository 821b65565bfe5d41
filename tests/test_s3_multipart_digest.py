"""S3 with a digest known up front, above `multipart_threshold_bytes` (DESIGN.md §12, issue
#30, 3): a multipart upload straight at the final key, created with the final metadata and
ChecksumAlgorithm SHA256, each part with its own `x-amz-checksum-sha256`; the gateway's sha256
of the whole body compared with the digest before CompleteMultipartUpload, which is the
commit. No staging key, no CopyObject; a mismatch or a part the store refuses aborts the
upload and is 400 `checksum mismatch`, nothing stored. On moto and on SeaweedFS.

What each server checks (docs/storage-s3.md): SeaweedFS verifies a PutObject's and each
part's `x-amz-checksum-sha256` (BadDigest) and the parts' checksums again on completion;
moto 5 verifies none of them, so the refused-part case runs on SeaweedFS alone."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import uuid
from typing import Any

from aiohttp.test_utils import TestClient

from gateway.backups.retention import RETENTION

from .conftest import S3Server, StartGateway
from .faultproxy import FaultProxy, RequestByRequest
from .servers import RedisServer, SeaweedServer
from .support import (
    KEEP_EVERYTHING,
    S3Harness,
    bearer,
    eventually,
    s3_settings,
    scrape,
    scraped_is,
    token_for,
)
from .test_digests import digest_of
from .test_retention import ONLY_LAST
from .test_s3_commit_outcome import LATE, PATIENT, gateway, plant_older, staging_keys
from .test_uploads import backups_of, head_for, upload

MiB = 1024**2
# S3's smallest part is 5 MiB (all but the last); the gateway's settings take 5 MiB too. A
# store's answer to a part is awaited 5 s (the suite's 1 s is for the bodiless calls): on a
# busy machine SeaweedFS took over 1.25 s to answer a 5 MiB part while another went up
PARTS: dict[str, Any] = {
    "multipart_threshold_bytes": 6 * MiB,
    "multipart_part_bytes": 5 * MiB,
    "read_timeout_seconds": 5,
}
SIZE = 12 * MiB + 7  # three parts: 5 + 5 + 2 MiB and 7 bytes
PRUNES = "gateway_retention_prunes_total"
COMPLETE = re.compile(rb"^POST [^ ]*[?&]uploadId=")
PART_NUMBER = re.compile(rb"^PUT [^ ]*[?&]partNumber=(\d+)[& ]")
# test_s3_commit_outcome's gateway, in parts; the completion's own read (the S3 client's
# read timeout, 5 s in PARTS) outlasts the answers held here
COMMIT: dict[str, Any] = PARTS


def open_uploads(harness: S3Harness) -> list[Any]:
    return list(harness.client.list_multipart_uploads(Bucket=harness.bucket).get("Uploads", []))


def parts_stored(harness: S3Harness) -> list[int]:
    """The part numbers the store holds of the one open multipart upload (none open: [])."""
    uploads = open_uploads(harness)
    if not uploads:
        return []
    listed = harness.client.list_parts(
        Bucket=harness.bucket, Key=uploads[0]["Key"], UploadId=uploads[0]["UploadId"]
    )
    return [part["PartNumber"] for part in listed.get("Parts", [])]


def composite_sha256(data: bytes, part: int) -> str:
    """S3's checksum of a multipart object: the sha256 of its parts' sha256s, "-" and the
    number of parts."""
    digests = [hashlib.sha256(data[i : i + part]).digest() for i in range(0, len(data), part)]
    whole = base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()
    return f"{whole}-{len(digests)}"


async def gateway_behind(
    start_gateway: StartGateway,
    harness: S3Harness,
    endpoint: str,
    retention: dict[str, Any] | None = None,
    **extra: Any,
) -> TestClient:
    settings = s3_settings(endpoint, harness.bucket, versioning="off", **PARTS, **extra)
    storage = {"backend": "s3", "s3": settings, "retention": retention or KEEP_EVERYTHING}
    return await start_gateway(storage)


# --------------------------------------------------------------------------- stored


async def test_a_digest_upload_above_the_threshold_goes_up_in_parts_in_place(
    start_gateway: StartGateway, s3_server: S3Server, proxy: FaultProxy
) -> None:
    harness = S3Harness(s3_server.endpoint, f"mpd-{uuid.uuid4().hex[:10]}")
    client = await gateway_behind(start_gateway, harness, proxy.endpoint)
    data = os.urandom(SIZE)
    sha256 = hashlib.sha256(data).hexdigest()
    before = dict(proxy.faults.by_method)
    resp, body = await upload(
        client, data, filename="nightly.tar.gz", **{"Content-Digest": digest_of(data)}
    )
    assert resp.status == 201, body
    assert body["data"]["sha256"] == sha256
    # three parts, no CopyObject; CreateMultipartUpload and CompleteMultipartUpload
    sent = {m: n - before.get(m, 0) for m, n in proxy.faults.by_method.items()}
    assert sent.get(b"PUT") == 3 and sent.get(b"POST") == 2, sent
    assert sent.get(b"DELETE", 0) == 0  # no staging key to remove

    key = f"org_c1/KEY-C1/{body['data']['id']}"
    got = harness.client.get_object(Bucket=harness.bucket, Key=key)
    assert got["Body"].read() == data
    assert got["ContentType"] == "application/gzip"
    assert got["Metadata"]["sha256"] == sha256
    assert got["Metadata"]["filename"] == "nightly.tar.gz"
    assert got["Metadata"]["uploader-ip"] == "127.0.0.1"
    assert got["Metadata"]["uploaded-at"].startswith(body["data"]["uploaded_at"][:19])
    assert backups_of(harness) == [body["data"]["id"]]
    assert staging_keys(harness) == set()
    assert open_uploads(harness) == []
    if isinstance(s3_server, SeaweedServer):
        # the store kept each part's sha256: its object checksum is made of them
        head = harness.client.head_object(Bucket=harness.bucket, Key=key, ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"] == composite_sha256(data, 5 * MiB)

    # listed and described like any other backup
    listing = await client.get("/api/systems/sys_c1/backups", headers=bearer(token_for("org_c1")))
    items = (await listing.json())["data"]["backups"]
    assert [(i["id"], i["sha256"], i["size"]) for i in items] == [
        (body["data"]["id"], sha256, SIZE)
    ]


async def test_without_a_digest_the_same_body_is_staged_and_copied(
    start_gateway: StartGateway, s3_server: S3Server, proxy: FaultProxy
) -> None:
    """§9's staging path stays: the parts go to a staging key, copied into place."""
    harness = S3Harness(s3_server.endpoint, f"mpn-{uuid.uuid4().hex[:10]}")
    client = await gateway_behind(start_gateway, harness, proxy.endpoint)
    data = os.urandom(SIZE)
    before = dict(proxy.faults.by_method)
    resp, body = await upload(client, data)
    assert resp.status == 201, body
    sent = {m: n - before.get(m, 0) for m, n in proxy.faults.by_method.items()}
    assert sent.get(b"PUT") == 4, sent  # three parts and the CopyObject
    assert sent.get(b"DELETE") == 1, sent  # the staging key
    key = f"org_c1/KEY-C1/{body['data']['id']}"
    assert harness.client.get_object(Bucket=harness.bucket, Key=key)["Body"].read() == data
    assert staging_keys(harness) == set() and open_uploads(harness) == []


# --------------------------------------------------------------------------- refused


async def test_a_wrong_digest_above_the_threshold_stores_counts_and_prunes_nothing(
    start_gateway: StartGateway, s3_server: S3Server, redis_server: RedisServer
) -> None:
    harness = S3Harness(s3_server.endpoint, f"mpw-{uuid.uuid4().hex[:10]}")
    client, older, usage = await pruning_and_counting(
        start_gateway, harness, harness.endpoint, redis_server, **PARTS
    )
    data = os.urandom(SIZE)
    meant = bytearray(data)
    meant[-1] ^= 1  # the last byte of the last part
    resp, body = await upload(client, data, **{"Content-Digest": digest_of(bytes(meant))})
    assert (resp.status, body) == (400, {"code": 400, "message": "checksum mismatch", "data": {}})
    # aborted before the answer: nothing stored, no parts kept
    assert open_uploads(harness) == []
    assert backups_of(harness) == [older]
    assert harness.keys() == {f"org_c1/KEY-C1/{older}"}
    await client.app[RETENTION].settled()
    assert usage.get("backup:org_usage:org_c1") == b"123"
    assert await scrape(client, PRUNES) == 0
    assert backups_of(harness) == [older]


async def test_a_part_the_store_refuses_is_a_checksum_mismatch(
    start_gateway: StartGateway, seaweed_server: SeaweedServer
) -> None:
    """Bytes changed between the gateway and the store: the store's own check of the part
    (BadDigest) refuses it, the upload is aborted and answered as a mismatch. SeaweedFS only:
    moto does not verify a part's checksum (it would store the changed bytes)."""
    harness = S3Harness(seaweed_server.endpoint, f"mpr-{uuid.uuid4().hex[:10]}")
    relay = FlipByteIn(int(seaweed_server.port), re.compile(rb"^PUT [^ ]*[?&]partNumber=2[& ]"))
    await relay.start()
    try:
        client = await gateway_behind(start_gateway, harness, relay.endpoint)
        data = os.urandom(SIZE)
        resp, body = await upload(client, data, **{"Content-Digest": digest_of(data)})
        assert (resp.status, body["message"]) == (400, "checksum mismatch")
        assert relay.flipped == 1
        assert open_uploads(harness) == []
        assert harness.keys() == set()
    finally:
        await relay.close()


async def test_a_body_cut_short_between_parts_leaves_no_parts(
    start_gateway: StartGateway, s3_server: S3Server
) -> None:
    harness = S3Harness(s3_server.endpoint, f"mpc-{uuid.uuid4().hex[:10]}")
    client = await gateway_behind(start_gateway, harness, harness.endpoint)
    data = os.urandom(SIZE)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(head_for(SIZE, f"Content-Digest: {digest_of(data)}") + data[: 7 * MiB])
    await writer.drain()
    await eventually(lambda: open_uploads(harness), "the upload going up in parts")
    writer.transport.abort()
    await eventually(lambda: not open_uploads(harness), "the cut upload's parts aborted")
    assert harness.keys() == set()
    del reader


async def test_the_next_part_is_read_and_sent_while_one_goes_up(
    start_gateway: StartGateway, s3_server: S3Server
) -> None:
    """Part 1 held at the store: the parts after it are read from the appliance and go up
    meanwhile, one at a time beside it (a part read and sent one after the other stalls
    both sides); the upload completes once part 1 is up. (How many parts are in memory at
    once: test_parts_in_flight.py.)"""
    harness = S3Harness(s3_server.endpoint, f"mpf-{uuid.uuid4().hex[:10]}")
    relay = HoldFirstPart(int(s3_server.port))
    await relay.start()
    try:
        client = await gateway_behind(start_gateway, harness, relay.endpoint)
        data = os.urandom(SIZE)
        sending = asyncio.ensure_future(upload(client, data, **{"Content-Digest": digest_of(data)}))
        await eventually(lambda: parts_stored(harness) == [2, 3], "parts 2 and 3 stored")
        assert relay.parts == [1, 2, 3]
        assert not sending.done()
        assert harness.keys() == set()  # nothing visible before the completion
        relay.release.set()
        resp, body = await sending
        assert resp.status == 201, body
        key = f"org_c1/KEY-C1/{body['data']['id']}"
        assert harness.client.get_object(Bucket=harness.bucket, Key=key)["Body"].read() == data
        assert open_uploads(harness) == []
    finally:
        relay.release.set()
        await relay.close()


# --------------------------------------------------------------------------- the commit


async def test_a_completion_answered_within_the_operation_time_is_201(
    start_gateway: StartGateway, s3_server: S3Server, proxy: FaultProxy
) -> None:
    harness = S3Harness(s3_server.endpoint, f"mpk-{uuid.uuid4().hex[:10]}")
    client = await gateway(start_gateway, harness, proxy, PATIENT, **COMMIT)
    older = plant_older(harness)
    proxy.faults.hold_answers = [(COMPLETE, LATE)]
    data = os.urandom(SIZE)
    resp, body = await upload(client, data, **{"Content-Digest": digest_of(data)})
    assert (resp.status, body["message"]) == (201, "backup stored")
    assert proxy.faults.held == 1
    await eventually(lambda: backups_of(harness) == [body["data"]["id"]], f"{older} pruned")
    await eventually(lambda: scraped_is(client, PRUNES, 1), "the prune counted")
    assert open_uploads(harness) == [] and staging_keys(harness) == set()


async def test_a_completion_that_lands_after_the_answer_is_504_with_its_bookkeeping_done(
    start_gateway: StartGateway, s3_server: S3Server, proxy: FaultProxy
) -> None:
    """Once CompleteMultipartUpload is sent the backup may land: never a 408."""
    harness = S3Harness(s3_server.endpoint, f"mpl-{uuid.uuid4().hex[:10]}")
    client = await gateway(start_gateway, harness, proxy, **COMMIT)
    older = plant_older(harness)
    proxy.faults.hold_answers = [(COMPLETE, 600.0)]
    data = os.urandom(SIZE)
    resp, body = await upload(client, data, **{"Content-Digest": digest_of(data)})
    assert (resp.status, body) == (
        504,
        {"code": 504, "message": "upload outcome unknown", "data": {}},
    )
    proxy.faults.release_held.set()  # the answer goes after the 504, within its own time
    await landed_and_pruned_for(client, harness, older, data)
    assert open_uploads(harness) == []


# --------------------------------------------------------------------------- helpers


async def landed_and_pruned_for(
    client: TestClient, harness: S3Harness, older: str, data: bytes
) -> None:
    """The upload's backup landed whole (whatever its answer said), the older backup pruned
    by the retention its landing started, and the prune counted."""
    landed = await eventually(
        lambda: [b for b in backups_of(harness) if b != older] or None, "the backup"
    )
    await eventually(lambda: backups_of(harness) == landed, f"{older} pruned")
    await eventually(lambda: scraped_is(client, PRUNES, 1), "the prune counted")
    assert landed is not None
    key = f"org_c1/KEY-C1/{landed[0]}"
    assert harness.client.get_object(Bucket=harness.bucket, Key=key)["Body"].read() == data


async def pruning_and_counting(
    start_gateway: StartGateway,
    harness: S3Harness,
    endpoint: str,
    redis_server: RedisServer,
    **s3: Any,
) -> tuple[TestClient, str, Any]:
    """A gateway that keeps one backup and counts usage in Redis, with an older backup
    planted (the one an upload that landed would prune) and the organization's counter at
    123: (the client, the older backup's id, the Redis client of the counter)."""
    settings = s3_settings(endpoint, harness.bucket, versioning="off", **s3)
    storage = {
        "backend": "s3",
        "s3": settings,
        "usage_counter": {"enabled": True},
        "retention": {"keep_last": 1, **ONLY_LAST, "uploads_per_minute": 0},
    }
    client = await start_gateway(storage, redis={"url": redis_server.url})
    older = plant_older(harness)
    usage = redis_server.client(1)
    usage.set("backup:org_usage:org_c1", "123")
    return client, older, usage


class FlipByteIn(RequestByRequest):
    """The fault proxy flipping one byte in the body of each request whose head `marker`
    matches (an UploadPart by its number, a PutObject), as a faulty network or disk between
    the gateway and the store would."""

    def __init__(self, upstream_port: int, marker: re.Pattern[bytes]) -> None:
        super().__init__("127.0.0.1", upstream_port)
        self._marker = marker
        self.flipped = 0

    def passed(self, head: bytes, body: bytes) -> bytes:
        if body and self._marker.search(head):
            changed = bytearray(body)
            changed[len(body) // 2] ^= 0xFF
            body = bytes(changed)
            self.flipped += 1
        return head + body


class HoldFirstPart(RequestByRequest):
    """The fault proxy holding UploadPart 1 at its head until `release` is set; `parts`
    lists the part numbers whose heads it read, in order."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__("127.0.0.1", upstream_port)
        self.release = asyncio.Event()
        self.parts: list[int] = []

    async def head_read(self, head: bytes) -> None:
        number = PART_NUMBER.search(head)
        if number is None:
            return
        self.parts.append(int(number.group(1)))
        if number.group(1) == b"1":
            await self.release.wait()
