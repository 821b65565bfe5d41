"""Faults between the gateway and S3 (a TCP fault proxy): each is a 502 or 504 in bounded time,
never a hang, never a 200 unless the object is gone, and nothing gone after a non-200 unless
the log says the outcome of a delete call was unknown."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from .conftest import StartGateway
from .faultproxy import RESET, FaultProxy, S3Answer
from .support import (
    KEEP_EVERYTHING,
    S3Harness,
    bearer,
    eventually,
    location_for,
    new_backup_id,
    s3_settings,
    storage_scanned,
    token_for,
)

OPERATION_TIMEOUT = 3.0


async def gateway(
    start_gateway: StartGateway, harness: S3Harness, proxy: FaultProxy, **s3: Any
) -> TestClient:
    settings = s3_settings(proxy.endpoint, harness.bucket, versioning="off", **s3)
    client = await start_gateway(
        {
            "backend": "s3",
            "operation_timeout_seconds": OPERATION_TIMEOUT,
            "s3": settings,
            # no start-up sweep among the requests the proxy counts
            "retention": KEEP_EVERYTHING,
        }
    )
    # nor the fleet's start-up scan: the proxy counts the test's requests from zero
    await storage_scanned(client)
    proxy.reset()
    return client


async def timed_delete(client: TestClient, bid: str) -> tuple[Any, float]:
    started = time.monotonic()
    resp = await client.delete(
        f"/api/systems/sys_c1/backups/{bid}", headers=bearer(token_for("org_c1"))
    )
    await resp.read()
    return resp, time.monotonic() - started


FAULTS: dict[str, dict[str, Any]] = {
    "delay beyond read timeout": {"delay": 2.5},
    "drop": {"drop": True},
    "reset mid-response": {"reset_after_bytes": 20},
    "slow trickle": {"trickle": 0.3},
}


@pytest.mark.parametrize("fault", FAULTS, ids=list(FAULTS))
async def test_fault_is_bounded_502_and_deletes_nothing(
    start_gateway: StartGateway,
    s3_harness: S3Harness,
    proxy: FaultProxy,
    fault: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await gateway(start_gateway, s3_harness, proxy)
    bid = new_backup_id()
    s3_harness.put(location_for("org_c1", bid))
    for name, value in FAULTS[fault].items():
        setattr(proxy.faults, name, value)
    with caplog.at_level(logging.WARNING):
        resp, elapsed = await timed_delete(client, bid)
    assert resp.status == 502, fault
    assert (await resp.json())["data"] == {"type": "external_api_error", "errors": []}
    assert elapsed < OPERATION_TIMEOUT + 5, (fault, elapsed)  # a loaded machine's margin
    # the HEAD never completed, so nothing was deleted, and the log says so
    assert s3_harness.exists(location_for("org_c1", bid))
    assert any(
        "head_object failed" in r.getMessage() and "nothing was deleted" in r.getMessage()
        for r in caplog.records
    )
    # the fault clears: the same process serves again
    proxy.reset()
    resp, _ = await timed_delete(client, bid)
    assert resp.status == 200
    assert not s3_harness.exists(location_for("org_c1", bid))


async def heal_after(proxy: FaultProxy, requests: int) -> None:
    """Stop cutting answers once `requests` requests went through the proxy."""
    await eventually(lambda: proxy.faults.requests >= requests, "requests", every=0.005)
    proxy.faults.reset_responses_after = None


# The delete's HEAD, then the backup's marks (DESIGN.md §11: is it protected?) in a
# ListObjectsV2. The DELETE is the third request.
BEFORE_THE_DELETE = 2


async def test_lost_delete_answer_is_completed_by_a_retry(
    start_gateway: StartGateway, s3_harness: S3Harness, proxy: FaultProxy
) -> None:
    # HEAD passes; the DELETE is applied upstream but its answer is cut. botocore retries
    # the (idempotent) DeleteObject, which succeeds: a 200, and the object is really gone.
    client = await gateway(start_gateway, s3_harness, proxy, max_attempts=3)
    bid = new_backup_id()
    s3_harness.put(location_for("org_c1", bid))
    proxy.faults.reset_responses_after = BEFORE_THE_DELETE
    healer = asyncio.ensure_future(heal_after(proxy, requests=BEFORE_THE_DELETE + 1))
    try:
        resp, _ = await timed_delete(client, bid)
    finally:
        healer.cancel()
    assert resp.status == 200
    assert proxy.faults.requests >= BEFORE_THE_DELETE + 2  # the cut DELETE, its retry
    assert not s3_harness.exists(location_for("org_c1", bid))


async def test_lost_delete_answer_without_retries_is_502_and_logged_as_unknown(
    start_gateway: StartGateway,
    s3_harness: S3Harness,
    proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # With retries off, the cut DELETE answer is a 502 although the store applied it.
    # The only non-200 that may leave an object gone, and the log names it.
    client = await gateway(start_gateway, s3_harness, proxy, max_attempts=1)
    bid = new_backup_id()
    s3_harness.put(location_for("org_c1", bid))
    proxy.faults.reset_responses_after = BEFORE_THE_DELETE
    with caplog.at_level(logging.WARNING):
        resp, elapsed = await timed_delete(client, bid)
    assert resp.status == 502
    assert elapsed < OPERATION_TIMEOUT + 5  # a loaded machine's margin
    assert not s3_harness.exists(location_for("org_c1", bid))
    assert any(
        "delete_object failed" in r.getMessage() and "outcome unknown" in r.getMessage()
        for r in caplog.records
    )
    # a retry by the caller settles it: the backup is gone
    proxy.reset()
    resp, _ = await timed_delete(client, bid)
    assert resp.status == 404


# --------------------------------------------------------------------------- retry classes
# The signed path (HeadObject, DeleteObject, ListObjectsV2, CopyObject) retries as botocore's
# standard mode does. The proxy answers the first DeleteObject itself, never relaying it; a
# retry goes through to the store.

# each answer, and what the delete then is: its status, and how many DELETEs were sent
ANSWERS: dict[str, tuple[S3Answer, int, int]] = {
    "5xx": (S3Answer(500, "InternalError"), 200, 2),
    "SlowDown": (S3Answer(503, "SlowDown"), 200, 2),
    "RequestTimeout": (S3Answer(400, "RequestTimeout"), 200, 2),  # a 400, retried for its code
    "throttling code": (S3Answer(400, "Throttling"), 200, 2),
    "reset connection": (RESET, 200, 2),
    "AccessDenied, not retried": (S3Answer(403, "AccessDenied"), 502, 1),
}


@pytest.mark.parametrize(("answer", "status", "deletes"), ANSWERS.values(), ids=list(ANSWERS))
async def test_each_failure_is_retried_as_botocore_classifies_it(
    start_gateway: StartGateway,
    s3_harness: S3Harness,
    proxy: FaultProxy,
    answer: S3Answer,
    status: int,
    deletes: int,
) -> None:
    client = await gateway(start_gateway, s3_harness, proxy, max_attempts=3)
    bid = new_backup_id()
    s3_harness.put(location_for("org_c1", bid))
    proxy.faults.answers = {b"DELETE": [answer]}
    resp, _ = await timed_delete(client, bid)
    assert resp.status == status, await resp.text()
    assert proxy.faults.by_method[b"DELETE"] == deletes  # the failed one, and any retry
    assert s3_harness.exists(location_for("org_c1", bid)) == (status != 200)


async def test_retries_stop_once_the_retry_quota_is_drained(
    start_gateway: StartGateway, s3_harness: S3Harness, proxy: FaultProxy
) -> None:
    """A store failing every request is not sent every retry of every request: once a
    burst has drained the retry quota, each request is sent once."""
    client = await gateway(start_gateway, s3_harness, proxy, max_attempts=3)
    proxy.faults.answer_every = S3Answer(500, "InternalError")
    burst = 100
    answers = await asyncio.gather(*(timed_delete(client, new_backup_id()) for _ in range(burst)))
    assert [resp.status for resp, _ in answers] == [502] * burst
    # each delete stopped at its HEAD, and not every one got its two retries
    assert proxy.faults.by_method[b"HEAD"] < 3 * burst
    before = proxy.faults.by_method[b"HEAD"]
    resp, _ = await timed_delete(client, new_backup_id())
    assert resp.status == 502
    assert proxy.faults.by_method[b"HEAD"] == before + 1  # the quota is spent: no retry
    # the store recovers: answered at once, without the retries it no longer needs
    proxy.faults.answer_every = None
    bid = new_backup_id()
    s3_harness.put(location_for("org_c1", bid))
    resp, _ = await timed_delete(client, bid)
    assert resp.status == 200
    assert not s3_harness.exists(location_for("org_c1", bid))
