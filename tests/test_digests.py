"""Upload digests (DESIGN.md §12, RFC 9530): checked before the body, compared after it, and
a retry within the window is not a second backup. On every backend."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import uuid
from typing import Any

import pytest

from gateway.backups.retention import RETENTION

from .conftest import Harness, S3Server, StartGateway
from .faultproxy import FaultProxy
from .support import (
    KEEP_EVERYTHING,
    LocalHarness,
    S3Harness,
    eventually,
    location_for,
    new_backup_id,
    s3_settings,
)
from .test_uploads import backups_of, envelope_of, head_for, raw, upload


def digest_of(data: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"


@pytest.mark.parametrize("header", ["Content-Digest", "Repr-Digest"])
async def test_a_matching_digest_is_stored(
    start_gateway: StartGateway, harness: Harness, header: str
) -> None:
    client = await start_gateway(harness.storage())
    data = os.urandom(50_000)
    resp, body = await upload(client, data, **{header: digest_of(data)})
    assert resp.status == 201, body
    assert body["data"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert backups_of(harness) == [body["data"]["id"]]


async def test_members_of_other_algorithms_are_ignored(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    client = await start_gateway({**local_harness.storage(), "retention": {"require_digest": True}})
    data = b"payload"
    sha512 = "sha-512=:" + base64.b64encode(hashlib.sha512(data).digest()).decode() + ":"
    resp, body = await upload(client, data, **{"Content-Digest": sha512})
    assert (resp.status, body["message"]) == (400, "digest required")  # no sha-256: none
    both = f"{sha512}, {digest_of(data)}"
    resp, body = await upload(client, data, **{"Content-Digest": both})
    assert resp.status == 201, body


@pytest.mark.parametrize(
    "headers",
    [
        ["Content-Digest: @@@"],
        ["Content-Digest: sha-256=notbytes"],
        ["Content-Digest: sha-256=:" + base64.b64encode(b"x" * 31).decode() + ":"],
        ["Content-Digest: sha-256=:not base64:"],
        ["Content-Digest: " + digest_of(b"data"), "Repr-Digest: " + digest_of(b"other")],
        ["Content-Digest: sha-256=(:AAAA: :BBBB:)"],
    ],
)
async def test_a_malformed_digest_is_400_before_the_body(
    start_gateway: StartGateway, local_harness: LocalHarness, headers: list[str]
) -> None:
    client = await start_gateway(local_harness.storage())
    answer = await raw(client, head_for(4, "Expect: 100-continue", *headers))
    assert b"100 Continue" not in answer
    status, body = envelope_of(answer)
    assert (status, body) == (400, {"code": 400, "message": "invalid digest", "data": {}})
    assert backups_of(local_harness) == []


async def test_a_body_that_differs_from_its_digest_stores_and_prunes_nothing(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway(
        {
            **harness.storage(),
            "retention": {"keep_last": 1, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0},
        }
    )
    kept = (await upload(client, b"the good one"))[1]["data"]["id"]
    await client.app[RETENTION].settled()
    resp, body = await upload(client, b"sent", **{"Content-Digest": digest_of(b"meant")})
    assert (resp.status, body) == (400, {"code": 400, "message": "checksum mismatch", "data": {}})
    await client.app[RETENTION].settled()
    assert backups_of(harness) == [kept]


async def test_a_digest_can_be_required(start_gateway: StartGateway, harness: Harness) -> None:
    client = await start_gateway({**harness.storage(), "retention": {"require_digest": True}})
    resp, body = await upload(client, b"data")
    assert (resp.status, body["message"]) == (400, "digest required")
    assert backups_of(harness) == []


async def test_a_retry_within_the_window_is_not_a_second_backup(
    start_gateway: StartGateway, harness: Harness
) -> None:
    client = await start_gateway(
        {
            **harness.storage(),
            "retention": {"keep_last": 2, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0},
        }
    )
    older = (await upload(client, b"yesterday's"))[1]["data"]["id"]
    data = os.urandom(10_000)
    first = await upload(client, data, **{"Content-Digest": digest_of(data)})
    assert first[0].status == 201
    again = await upload(client, data, **{"Content-Digest": digest_of(data)})
    assert (again[0].status, again[1]["message"]) == (200, "backup already stored")
    assert again[1]["data"] == first[1]["data"]
    await client.app[RETENTION].settled()
    assert backups_of(harness) == sorted([older, first[1]["data"]["id"]])  # nothing pushed out


async def test_a_retry_sent_while_the_first_is_still_going_is_not_a_second_backup(
    start_gateway: StartGateway, harness: Harness
) -> None:
    """An appliance that gave up waiting and sent again while its first upload was still
    going: both bodies arrive side by side, the one that commits first is stored (201), the
    other finds it under the system's lock and is answered with it (200), storing nothing."""
    client = await start_gateway({**harness.storage(), "retention": KEEP_EVERYTHING})
    data = os.urandom(300_000)
    digest = f"Content-Digest: {digest_of(data)}"
    head = head_for(len(data), digest, "Content-Type: application/gzip", "Connection: close")
    connections = [await asyncio.open_connection("127.0.0.1", client.port) for _ in "ab"]
    for _, writer in connections:
        writer.write(head + data[:100_000])
        await writer.drain()
    for _, writer in connections:  # the rest of both at once
        writer.write(data[100_000:])
    await asyncio.gather(*(writer.drain() for _, writer in connections))
    answers = [envelope_of(await reader.read()) for reader, _ in connections]
    for _, writer in connections:
        writer.close()
    assert sorted(status for status, _ in answers) == [200, 201], answers
    stored = next(body for status, body in answers if status == 201)
    repeated = next(body for status, body in answers if status == 200)
    assert repeated == {"code": 200, "message": "backup already stored", "data": stored["data"]}
    assert backups_of(harness) == [stored["data"]["id"]]


async def test_outside_the_window_the_same_bytes_are_a_new_backup(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    client = await start_gateway(
        {**local_harness.storage(), "retention": {"duplicate_window_seconds": 0}}
    )
    data = b"same bytes"
    answers = [await upload(client, data, **{"Content-Digest": digest_of(data)}) for _ in "ab"]
    assert [a[0].status for a in answers] == [201, 201]
    assert len(backups_of(local_harness)) == 2


async def test_a_backup_planted_without_a_sha256_is_never_a_duplicate(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    """A backup whose stored sha256 is unknown never answers for a retry."""
    client = await start_gateway(local_harness.storage())
    data: Any = b"planted"
    local_harness.put(location_for("org_c1", new_backup_id()), data)  # sidecar without sha256
    resp, _ = await upload(client, data, **{"Content-Digest": digest_of(data)})
    assert resp.status == 201


# --------------------------------------------------------------------------- S3: one PUT


async def test_on_s3_a_digest_known_up_front_goes_in_place_with_no_copy(
    start_gateway: StartGateway, s3_server: S3Server, proxy: FaultProxy
) -> None:
    """No staging key, no CopyObject: the body goes to its final key with its metadata and
    the store's own check (x-amz-checksum-sha256), as the one part of a multipart upload
    that only the commit completes (POSTs). Without a digest, §9's staging path."""
    harness = S3Harness(s3_server.endpoint, f"dig-{uuid.uuid4().hex[:10]}")
    settings = s3_settings(proxy.endpoint, harness.bucket, versioning="off")
    client = await start_gateway({"backend": "s3", "s3": settings, "retention": KEEP_EVERYTHING})
    data = os.urandom(20_000)
    puts = proxy.faults.by_method[b"PUT"]
    resp, body = await upload(client, data, **{"Content-Digest": digest_of(data)})
    assert resp.status == 201, body
    assert proxy.faults.by_method[b"PUT"] - puts == 1  # one UploadPart, no copy
    head = harness.client.head_object(
        Bucket=harness.bucket, Key=f"org_c1/KEY-C1/{body['data']['id']}"
    )
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert head["Metadata"]["filename"] == "backup.tar.gz"
    puts = proxy.faults.by_method[b"PUT"]
    resp, body = await upload(client, data + b"!")  # no digest: staged, then copied
    assert resp.status == 201, body
    assert proxy.faults.by_method[b"PUT"] - puts == 2
    assert not [k for k in harness.keys() if k.startswith(".uploads/")]


async def test_on_s3_bytes_that_are_not_the_digests_leave_nothing(
    start_gateway: StartGateway, s3_harness: S3Harness
) -> None:
    client = await start_gateway(s3_harness.storage())
    resp, body = await upload(client, b"what was sent", **{"Content-Digest": digest_of(b"meant")})
    assert (resp.status, body["message"]) == (400, "checksum mismatch")
    await eventually(lambda: backups_of(s3_harness) == [], "the refused body removed")
    assert not [k for k in s3_harness.keys() if k.startswith(".uploads/")]
