"""The reservations in the platform's Redis, in keys of our own (see `reservations`).

Per system and per organization: a hash `backup_gateway:reserved:<scope>:<id>` of
reservation id → "<expiry, Redis ms> <bytes>", and a release count
`backup_gateway:released:<scope>:<id>`. Expiries use the Redis server's clock (`TIME`),
so the gateway hosts' clocks need not agree. Expired entries are dropped, counting as
releases, by whichever script meets them first.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from .reservations import RELEASES_KEPT_SECONDS, Claim, Refused, Reserved, Room, Seen

REDIS_SECONDS = 1.0

# Shared by the scripts: the time, and a scope's live reserved bytes (expired ones dropped
# and counted as releases). KEYS: system hash, organization hash, their release counts.
_HELD = """
redis.replicate_commands()
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function held(hash, releases)
  local total, expired = 0, false
  local entries = redis.call('HGETALL', hash)
  for i = 1, #entries, 2 do
    local expiry, size = string.match(entries[i + 1], '^(%d+) (%d+)$')
    if tonumber(expiry) <= now then
      redis.call('HDEL', hash, entries[i])
      expired = true
    else
      total = total + tonumber(size)
    end
  end
  if expired then
    redis.call('INCR', releases)
    redis.call('EXPIRE', releases, ARGV[1])
  end
  return total
end
local system = held(KEYS[1], KEYS[3])
local organization = held(KEYS[2], KEYS[4])
local function releases(key) return tonumber(redis.call('GET', key) or '0') end
"""

# ARGV: releases kept seconds
_LOOK = (
    _HELD
    + """
return {system, organization, releases(KEYS[3]), releases(KEYS[4])}
"""
)

# ARGV: releases kept seconds, id, size, ms until expiry, system cap, kept bytes,
# organization cap, used bytes. The check of `reservations.refusal`, then the reservation.
_CHECK_AND_RESERVE = (
    _HELD
    + """
local answer = {0, system, organization, releases(KEYS[3]), releases(KEYS[4])}
local size = tonumber(ARGV[3])
local system_cap, kept = tonumber(ARGV[5]), tonumber(ARGV[6])
local organization_cap, used = tonumber(ARGV[7]), tonumber(ARGV[8])
if system_cap > 0 and kept + system > system_cap then
  answer[1] = 1
  return answer
end
if organization_cap > 0 and used + organization + size > organization_cap then
  answer[1] = 2
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


class RedisBook:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._look = client.register_script(_LOOK)
        self._check_and_reserve = client.register_script(_CHECK_AND_RESERVE)

    async def look(self, system_key: str, organization_id: str) -> Seen:
        async with asyncio.timeout(REDIS_SECONDS):
            replies = await self._look(
                keys=_keys(system_key, organization_id), args=[RELEASES_KEPT_SECONDS]
            )
        system, organization, system_releases, organization_releases = map(int, replies)
        return Seen(system, organization, system_releases, organization_releases)

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
        status, system, organization, system_releases, organization_releases = map(int, replies)
        if status:
            return Refused("system" if status == 1 else "organization")
        return Reserved(
            system,
            organization,
            system_stale=system_releases != seen.system_releases,
            organization_stale=organization_releases != seen.organization_releases,
        )

    async def release(self, claim: Claim) -> None:
        keys = _keys(claim.system_key, claim.organization_id)
        reserved, releases = keys[:2], keys[2:]
        async with asyncio.timeout(REDIS_SECONDS):
            pipe = self._redis.pipeline(transaction=True)
            for hash_key in reserved:
                pipe.hdel(hash_key, claim.id)
            for count_key in releases:
                pipe.incr(count_key)
                pipe.expire(count_key, RELEASES_KEPT_SECONDS)
            await pipe.execute()


def _keys(system_key: str, organization_id: str) -> list[str]:
    """The system's and the organization's reservations, then their release counts."""
    return [
        f"backup_gateway:reserved:system:{system_key}",
        f"backup_gateway:reserved:org:{organization_id}",
        f"backup_gateway:released:system:{system_key}",
        f"backup_gateway:released:org:{organization_id}",
    ]
