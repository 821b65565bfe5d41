"""Clients for the platform's Redis: one per database, each its own small pool."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.connection import ConnectionPool

# Every call the gateway makes to Redis is answered within this, or given up.
TIMEOUT_SECONDS = 1.0


def redis_client(url: str, db: int) -> aioredis.Redis:
    """A client for database `db` of the Redis at `url`; connects on first use.

    `db` wins over a database in the URL's path: revocations and the usage counter live in
    different databases of one server (DESIGN.md §7)."""
    pool = ConnectionPool.from_url(
        url,
        socket_timeout=TIMEOUT_SECONDS,
        socket_connect_timeout=TIMEOUT_SECONDS,
        retry_on_timeout=False,
        max_connections=64,
    )
    pool.connection_kwargs["db"] = db
    return aioredis.Redis.from_pool(pool)
