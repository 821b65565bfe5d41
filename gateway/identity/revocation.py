"""The platform's token revocations, read from its Redis (DESIGN.md §7).

A token is revoked when `jwt_blacklist:<hex sha256 of the raw token>` exists, or
`jwt_user_blacklist:<id>` for its `user.id` or `user.logto_id`. The client is made by the
app's wiring (`gateway.redis_clients`) and handed in. One EXISTS over those keys
answers; a "not revoked" answer is reused for at most `auth.revocation.cache_seconds`,
whatever the verified-token cache holds. Requests with one token whose answer is not held
share one lookup: otherwise every request in flight when the answer ages out asks Redis
for the same thing, each second, and waits on the others in the client's pool. Each
lookup is bounded to one second: past it, or with Redis down, `on_error: deny` refuses the
request (503) and `allow` lets it through.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from ..config import RevocationConfig
from ..telemetry.metrics import Metrics
from .principal import Principal

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 1.0
MAX_REMEMBERED = 65_536


class TokenRevoked(Exception):
    """The platform revoked this token, or every token of its user."""


class RevocationUnavailable(Exception):
    """Redis could not say whether the token is revoked; the message is for logs."""


class RevocationChecker:
    def __init__(
        self,
        config: RevocationConfig,
        client: aioredis.Redis,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._clock = clock
        self._redis: aioredis.Redis | None = client
        self._not_revoked: dict[str, float] = {}  # sha256 hex -> reuse until (clock)
        # lookups in flight by sha256 hex: a task each, so that one caller going away does
        # not cancel the others' answer (held here: the loop keeps weak references)
        self._asking: dict[str, asyncio.Task[bool]] = {}
        self.errors = 0
        self._last_logged = -1.0

    async def close(self) -> None:
        if self._asking:  # each bounded to LOOKUP_TIMEOUT
            await asyncio.wait(list(self._asking.values()), timeout=LOOKUP_TIMEOUT + 1)
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def export_metrics(self, metrics: Metrics) -> None:
        metrics.add_reading(
            "counter",
            "gateway_revocation_lookup_errors",
            "Revocation lookups Redis did not answer in time",
            lambda: self.errors,
        )

    async def check(self, token: str, principal: Principal) -> None:
        """Raise TokenRevoked, or RevocationUnavailable (with on_error: deny)."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock()
        until = self._not_revoked.get(digest)
        if until is not None and until > now:
            return
        lookup = self._asking.get(digest)
        if lookup is None:
            # one token, one set of claims: the keys are the same for every caller
            lookup = asyncio.ensure_future(self._revoked(digest, principal))
            self._asking[digest] = lookup
            lookup.add_done_callback(lambda done: self._asked(digest, done))
        try:
            revoked = await asyncio.shield(lookup)
        except (RedisError, OSError, TimeoutError) as exc:
            if self._config.on_error == "allow":
                return
            raise RevocationUnavailable(f"redis: {type(exc).__name__}") from None
        if revoked:
            raise TokenRevoked(principal.user_id)

    async def _revoked(self, digest: str, principal: Principal) -> bool:
        """Ask Redis; hold a "not revoked" answer (counted from when it was asked)."""
        asked_at = self._clock()
        keys = [f"jwt_blacklist:{digest}"]
        keys += [f"jwt_user_blacklist:{u}" for u in {principal.user_id, principal.logto_id} if u]
        try:
            assert self._redis is not None, "revocation checker closed"
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                found = await self._redis.exists(*keys)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            raise
        if found:
            self._not_revoked.pop(digest, None)
            return True
        if self._config.cache_seconds > 0:
            if len(self._not_revoked) >= MAX_REMEMBERED:
                del self._not_revoked[next(iter(self._not_revoked))]
            self._not_revoked[digest] = asked_at + self._config.cache_seconds
        return False

    def _asked(self, digest: str, lookup: asyncio.Task[bool]) -> None:
        if self._asking.get(digest) is lookup:
            del self._asking[digest]
        if not lookup.cancelled():
            lookup.exception()  # seen: each caller gets it from the shield

    async def check_ready(self) -> None:
        try:
            assert self._redis is not None, "revocation checker closed"
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                await self._redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            raise RevocationUnavailable(f"redis: {type(exc).__name__}") from None

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        now = self._clock()
        if now - self._last_logged >= 1.0:  # at most a line a second while Redis is down
            self._last_logged = now
            log.warning(
                "revocation lookup failed (%s): %s",
                type(exc).__name__,
                "let through (on_error: allow)" if self._config.on_error == "allow" else "503",
            )


REVOCATION = web.AppKey("revocation", RevocationChecker)
