"""The reservations in the platform's Redis, in keys of our own (see `reservations`).

Per system and per organization: a hash `backup_gateway:reserved:<scope>:<id>` of
reservation id → "<expiry, Redis ms> <bytes>", a hash `backup_gateway:landing:<scope>:<id>`
of the ids among them whose commit has been sent, and a release count
`backup_gateway:released:<scope>:<id>`. Expiries use the Redis server's clock (`TIME`),
so the gateway hosts' clocks need not agree. Expired entries are dropped, counting as
releases, by whichever script meets them first.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from .reservations import (
    RELEASES_KEPT_SECONDS,
    Claim,
    Refused,
    Releases,
    Reserved,
    Room,
    Seen,
)

REDIS_SECONDS = 1.0

# Shared by the scripts: the time, and a scope's live reserved bytes and the landing part
# of them (expired ones dropped and counted as releases). KEYS: system hash, organization
# hash, their release counts, their landing hashes.
_HELD = """
redis.replicate_commands()
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function held(hash, releases, landing)
  local total, landed, expired = 0, 0, false
  local entries = redis.call('HGETALL', hash)
  for i = 1, #entries, 2 do
    local expiry, size = string.match(entries[i + 1], '^(%d+) (%d+)$')
    if tonumber(expiry) <= now then
      redis.call('HDEL', hash, entries[i])
      redis.call('HDEL', landing, entries[i])
      expired = true
    else
      total = total + tonumber(size)
      if redis.call('HEXISTS', landing, entries[i]) == 1 then
        landed = landed + tonumber(size)
      end
    end
  end
  if expired then
    redis.call('INCR', releases)
    redis.call('EXPIRE', releases, ARGV[1])
  end
  return total, landed
end
local system, system_landing = held(KEYS[1], KEYS[3], KEYS[5])
local organization, organization_landing = held(KEYS[2], KEYS[4], KEYS[6])
local function releases(key) return tonumber(redis.call('GET', key) or '0') end
"""

# ARGV: releases kept seconds
_LOOK = (
    _HELD
    + """
return {system, organization, releases(KEYS[3]), releases(KEYS[4]),
        system_landing, organization_landing}
"""
)

# ARGV: releases kept seconds, id, size, ms until expiry, system cap, kept bytes,
# organization cap, used bytes. The check of `reservations.refusal`, then the reservation.
# The answer: refused (0: no, 1: system, 2: organization), the others' reserved bytes,
# the release counts, and whether the refusal is only through the landing ones (1).
_CHECK_AND_RESERVE = (
    _HELD
    + """
local size = tonumber(ARGV[3])
local system_cap, kept = tonumber(ARGV[5]), tonumber(ARGV[6])
local organization_cap, used = tonumber(ARGV[7]), tonumber(ARGV[8])
local function full(system_bytes, organization_bytes)
  if system_cap > 0 and kept + system_bytes > system_cap then return 1 end
  if organization_cap > 0 and used + organization_bytes + size > organization_cap then
    return 2
  end
  return 0
end
local answer = {full(system, organization), system, organization, releases(KEYS[3]),
                releases(KEYS[4]), 0}
if answer[1] ~= 0 then
  if full(system - system_landing, organization - organization_landing) == 0 then
    answer[6] = 1
  end
  return answer
end
local value = (now + tonumber(ARGV[4])) .. ' ' .. ARGV[3]
for _, hash in ipairs({KEYS[1], KEYS[2]}) do
  redis.call('HSET', hash, ARGV[2], value)
  if redis.call('PTTL', hash) < tonumber(ARGV[4]) then
    redis.call('PEXPIRE', hash, ARGV[4])
  end
end
return answer
"""
)

# ARGV: id. Marked only while reserved; a landing hash lives as long as its reservations'.
_LANDING = """
for i = 1, 2 do
  if redis.call('HEXISTS', KEYS[i], ARGV[1]) == 1 then
    redis.call('HSET', KEYS[i + 4], ARGV[1], '1')
    redis.call('PEXPIRE', KEYS[i + 4], math.max(1, redis.call('PTTL', KEYS[i])))
  end
end
"""


class RedisBook:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._look = client.register_script(_LOOK)
        self._check_and_reserve = client.register_script(_CHECK_AND_RESERVE)
        self._landing = client.register_script(_LANDING)

    async def look(self, system_key: str, organization_id: str) -> Seen:
        async with asyncio.timeout(REDIS_SECONDS):
            replies = await self._look(
                keys=_keys(system_key, organization_id), args=[RELEASES_KEPT_SECONDS]
            )
        system, organization, system_releases, organization_releases, *landing = map(int, replies)
        return Seen(
            system,
            organization,
            system_releases,
            organization_releases,
            system_landing=landing[0],
            organization_landing=landing[1],
        )

    async def reserve(self, claim: Claim, room: Room, seen: Seen) -> Reserved | Refused:
        args: list[str | int] = [
            RELEASES_KEPT_SECONDS,
            claim.id,
            claim.size,
            max(1, int(claim.seconds * 1000)),
            room.system_cap,
            room.kept,
            room.organization_cap,
            room.used,
        ]
        async with asyncio.timeout(REDIS_SECONDS):
            replies = await self._check_and_reserve(
                keys=_keys(claim.system_key, claim.organization_id), args=args
            )
        status, system, organization, system_releases, organization_releases, settling = map(
            int, replies
        )
        releases = Releases(system_releases, organization_releases)
        if status:
            if status == 1:
                return Refused("system", bool(settling), releases)
            return Refused("organization", bool(settling), releases)
        return Reserved(
            system,
            organization,
            system_stale=system_releases != seen.system_releases,
            organization_stale=organization_releases != seen.organization_releases,
            releases=releases,
        )

    async def landing(self, claim: Claim) -> None:
        async with asyncio.timeout(REDIS_SECONDS):
            await self._landing(
                keys=_keys(claim.system_key, claim.organization_id), args=[claim.id]
            )

    async def release(self, claim: Claim) -> None:
        keys = _keys(claim.system_key, claim.organization_id)
        reserved, releases = keys[:2] + keys[4:], keys[2:4]
        async with asyncio.timeout(REDIS_SECONDS):
            pipe = self._redis.pipeline(transaction=True)
            for hash_key in reserved:
                pipe.hdel(hash_key, claim.id)
            for count_key in releases:
                pipe.incr(count_key)
                pipe.expire(count_key, RELEASES_KEPT_SECONDS)
            await pipe.execute()


def _keys(system_key: str, organization_id: str) -> list[str]:
    """The system's and the organization's reservations, their release counts, then the
    landing ones among the reservations."""
    return [
        f"backup_gateway:reserved:system:{system_key}",
        f"backup_gateway:reserved:org:{organization_id}",
        f"backup_gateway:released:system:{system_key}",
        f"backup_gateway:released:org:{organization_id}",
        f"backup_gateway:landing:system:{system_key}",
        f"backup_gateway:landing:org:{organization_id}",
    ]
