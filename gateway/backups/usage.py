"""The platform's per-organization usage counter: dropped after every change (DESIGN.md §7).

The ingest service keeps `backup:org_usage:<organization_id>` in Redis and recomputes it
when it is missing; a stale one makes it refuse uploads with a false "quota exceeded". So
after every change that frees or adds bytes the gateway deletes the key — never DECRBY.
The organizations changed during one event-loop iteration go out in one DEL, sent at once,
bounded to a second: a failure is logged and counted and never changes an answer.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from ..telemetry.metrics import Metrics

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 1.0


def usage_key(organization_id: str) -> str:
    return f"backup:org_usage:{organization_id}"


class UsageCounter:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._due: set[str] = set()
        self._sending: set[asyncio.Task[None]] = set()
        self.drops = 0
        self.failures = 0

    def changed(self, organization_id: str) -> None:
        """Drop that organization's counter (within a second; never waits, never raises)."""
        if not self._due:
            asyncio.get_running_loop().call_soon(self._send)
        self._due.add(organization_id)

    def _send(self) -> None:
        organizations, self._due = self._due, set()
        task = asyncio.create_task(self._drop(sorted(organizations)))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _drop(self, organizations: list[str]) -> None:
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):
                await self._redis.delete(*map(usage_key, organizations))
            self.drops += len(organizations)
        except (RedisError, OSError, TimeoutError) as exc:
            self.failures += len(organizations)
            log.warning(
                "usage counter not dropped: %s",
                type(exc).__name__,
                extra={"fields": {"organization_ids": organizations}},
            )

    async def close(self) -> None:
        """Send what is due and wait for it (each send is bounded), then close the client."""
        if self._due:
            self._send()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        await self._redis.aclose()

    def export_metrics(self, metrics: Metrics) -> None:
        metrics.add_reading(
            "counter",
            "gateway_usage_counter_drops",
            "Organizations whose usage counter was dropped in Redis after a change",
            lambda: self.drops,
        )
        metrics.add_reading(
            "counter",
            "gateway_usage_counter_failures",
            "Usage counter drops that Redis did not confirm in time",
            lambda: self.failures,
        )


USAGE_COUNTER = web.AppKey("usage_counter", UsageCounter)
