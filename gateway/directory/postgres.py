"""The platform's own PostgreSQL as the directory (DESIGN.md §7), read only, through asyncpg.

Mapping: an organization's id is its `logto_id` in `distributors`, `resellers` or
`customers` (the table is its role, `custom_data->>'createdBy'` its parent); the Owner
organization is in no table and comes from the config. A system's `organization_id` is
used verbatim, and its `system_key` counts only once `registered_at` is set.

Organizations are looked up by the platform's unique partial indexes (`logto_id WHERE
deleted_at IS NULL`): a soft-deleted organization is not found, which the rules treat
exactly as deleted — nothing is reached through it. Every value that becomes a path
component (organization ids, system keys) must be a safe component: a system with an
unsafe one is answered "not found" and logged, never served.

Every query is parameterized, runs under the server's `statement_timeout`, and the whole
call (pool wait included) is bounded; past the bound, or with the database down, the
answer is DirectoryUnavailable, never a stale one. Caching is `CachedDirectory`'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Hashable
from typing import Any, TypeVar

import asyncpg

from ..config import PostgresDirectoryConfig
from ..telemetry.metrics import Metrics
from .base import (
    SAFE_COMPONENT,
    Directory,
    DirectoryUnavailable,
    Organization,
    System,
    SystemInTree,
)
from .batching import BatchedLookup
from .case_twins import CaseTwins, CaseTwinScanner
from .dsn_files import described_failure

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Each query answers many lookups at once (batching.py): its parameter is a text[] of them.
_SYSTEMS = """
SELECT id, organization_id, system_key AS raw_key,
       CASE WHEN registered_at IS NOT NULL THEN system_key END AS system_key,
       deleted_at IS NOT NULL AS deleted,
       suspended_at IS NOT NULL AS suspended,
       system_secret_public, system_secret_sha256{columns}
  FROM systems AS s{joins}
 WHERE {where}
"""
_SYSTEMS_BY_ID = _SYSTEMS.format(columns="", joins="", where="id = ANY($1::text[])")
# the unique partial index on system_key (WHERE system_key IS NOT NULL)
_SYSTEMS_BY_KEY = _SYSTEMS.format(
    columns="", joins="", where="system_key = ANY($1::text[]) AND registered_at IS NOT NULL"
)
# Names that differ from another only in case (case_twins.py): every system key, and every
# organization's logto_id in the three tables (deleted or not) and the Owner's ($1). A
# whole-table scan, so it runs in the background, never per lookup. COLLATE "C": an ASCII
# lower(), exact for the only names ever served (SAFE_COMPONENT), and 3x faster than the
# database's own collation; system_key is unique, so two rows that fold alike are twins.
_CASE_TWINS = """
SELECT 'system_key' AS kind, lower(system_key COLLATE "C") AS folded
  FROM systems WHERE system_key IS NOT NULL
 GROUP BY 2 HAVING count(*) > 1
UNION ALL
SELECT 'organization_id', lower(logto_id COLLATE "C")
  FROM (SELECT logto_id FROM distributors UNION ALL SELECT logto_id FROM resellers
        UNION ALL SELECT logto_id FROM customers UNION ALL SELECT $1::text) AS o(logto_id)
 WHERE logto_id IS NOT NULL
 GROUP BY 2 HAVING min(logto_id COLLATE "C") <> max(logto_id COLLATE "C")
"""
# One row per live organization with that logto_id; more than one is a data error.
_LIVE_ORGANIZATIONS = """
SELECT logto_id, 'distributor' AS role, custom_data->>'createdBy' AS parent
  FROM distributors WHERE logto_id {match} AND deleted_at IS NULL
UNION ALL
SELECT logto_id, 'reseller', custom_data->>'createdBy'
  FROM resellers WHERE logto_id {match} AND deleted_at IS NULL
UNION ALL
SELECT logto_id, 'customer', custom_data->>'createdBy'
  FROM customers WHERE logto_id {match} AND deleted_at IS NULL
"""
_ORGANIZATIONS = _LIVE_ORGANIZATIONS.format(match="= ANY($1::text[])")
# A system with its organization and the one that created that (what deciding on a caller
# other than the Owner takes), in one round trip. By LATERAL: an index probe per system and
# level, whatever the planner guesses of the rows before. An organization live in two
# tables gives two rows: a data error, refused as `_live_organizations` refuses it.
_TREE = dict(
    columns=""",
       o.role AS organization_role, o.parent AS organization_parent,
       c.logto_id AS creator_id, c.role AS creator_role, c.parent AS creator_parent""",
    joins="""
  LEFT JOIN LATERAL ({organization}) AS o ON true
  LEFT JOIN LATERAL ({creator}) AS c ON true""".format(
        organization=_LIVE_ORGANIZATIONS.format(match="= s.organization_id"),
        creator=_LIVE_ORGANIZATIONS.format(match="= o.parent"),
    ),
)
_SYSTEMS_IN_TREE = _SYSTEMS.format(**_TREE, where="s.id = ANY($1::text[])")
# The same with the caller's own organization beside it: what a request by any caller but
# the Owner takes when nothing is cached, one query (one backend to wake, not two). Asked
# in pairs: $1 the systems, $2 each one's caller.
_SYSTEMS_IN_TREE_AND_CALLERS = """
SELECT asked.caller_id, k.role AS caller_role, k.parent AS caller_parent, t.*
  FROM unnest($1::text[], $2::text[]) AS asked(system_id, caller_id)
  JOIN LATERAL ({tree}) AS t ON true
  LEFT JOIN LATERAL ({caller}) AS k ON true
""".format(
    tree=_SYSTEMS.format(**_TREE, where="s.id = asked.system_id"),
    caller=_LIVE_ORGANIZATIONS.format(match="= asked.caller_id"),
)
# The fleet (DESIGN.md §13). An organization's reach in one query: the caller's own
# organization ($1, of role $2: already found live with the role its token claims), the
# resellers and customers it created, and the customers its live resellers created — each
# live in exactly one organization table, as `organization` finds it — then their live,
# registered systems by the index on systems.organization_id. The platform keeps no index
# on custom_data->>'createdBy': its resellers and customers are read once per query (the
# customers of the caller and of its resellers in one pass; OFFSET 0 keeps the planner
# from checking every customer's tables before its creator).
# Ordered by id in code-point order (COLLATE "C"), as the file directory orders them, so a
# page's cursor means the same in both; streamed through a server-side cursor.
_LIVE_ONCE = "(SELECT count(*) FROM ({live}) AS l) = 1"
# only this module's constant fragments are joined: every value is a server-side parameter
_REACHED = """
SELECT $1::text
UNION
SELECT r.logto_id FROM resellers AS r
 WHERE $2::text = 'distributor' AND r.deleted_at IS NULL AND r.custom_data->>'createdBy' = $1
   AND {reseller_once}
UNION
SELECT c.logto_id FROM (
       SELECT c.logto_id FROM customers AS c
        WHERE $2::text IN ('distributor', 'reseller') AND c.deleted_at IS NULL
          AND c.custom_data->>'createdBy' IN (
              SELECT $1::text
              UNION
              SELECT r.logto_id FROM resellers AS r
               WHERE $2::text = 'distributor' AND r.deleted_at IS NULL
                 AND r.custom_data->>'createdBy' = $1 AND {reseller_once})
       OFFSET 0) AS c
 WHERE {customer_once}
""".format(  # noqa: S608
    reseller_once=_LIVE_ONCE.format(live=_LIVE_ORGANIZATIONS.format(match="= r.logto_id")),
    customer_once=_LIVE_ONCE.format(live=_LIVE_ORGANIZATIONS.format(match="= c.logto_id")),
)
_SERVED = "s.deleted_at IS NULL AND s.registered_at IS NOT NULL AND s.system_key IS NOT NULL"
# By LATERAL: an index probe of systems.organization_id per organization reached, whatever
# the planner guesses of how many there are (left to itself it scans the whole table).
_REACH = """
SELECT t.* FROM ({reached}) AS o(logto_id)
  JOIN LATERAL ({systems}) AS t ON true
 ORDER BY t.id COLLATE "C"
""".format(
    reached=_REACHED,
    systems=_SYSTEMS.format(
        columns="", joins="", where=f"s.organization_id = o.logto_id AND {_SERVED}"
    ),
)
# the Owner reaches every live, registered system, whatever its organization
_OWNER_REACH = _SYSTEMS.format(columns="", joins="", where=_SERVED) + ' ORDER BY s.id COLLATE "C"'
# what maps a folder (orphans, §13): every registered key, soft-deleted systems included
_REGISTERED = """
SELECT id, organization_id, system_key, deleted_at IS NOT NULL AS deleted
  FROM systems WHERE registered_at IS NOT NULL AND system_key IS NOT NULL
"""
# by the unique index on system_key
_MAPS_FOLDER = """
SELECT EXISTS (SELECT 1 FROM systems
                WHERE system_key = $1 AND organization_id = $2 AND registered_at IS NOT NULL)
"""
_STREAM_BATCH = 1000  # rows a server-side cursor hands over at once
_REACHING_ROLES = ("distributor", "reseller", "customer")
_UNAVAILABLE = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
)


async def _nothing_to_reset(connection: asyncpg.Connection) -> None:
    return None


class PostgresDirectory(Directory):
    def __init__(self, config: PostgresDirectoryConfig) -> None:
        assert config.dsn is not None and config.owner_organization_id is not None
        self._config = config
        self._owner = Organization(id=config.owner_organization_id, role="owner")
        # a query's answer (the server's statement_timeout); + 1 s: with the pool wait
        self._timeout = config.statement_timeout_seconds
        self._pool: asyncpg.Pool | None = None
        self._metrics: Metrics | None = None
        self._releasing: set[asyncio.Task[None]] = set()  # held: the loop keeps weak references
        # As many queries in flight as the pool has connections; the rest wait together, for
        # at most a query's bound (the one they wait for) and then their own.
        in_flight, wait = config.pool_size, 2 * (self._timeout + 1)
        self._systems = BatchedLookup(self._systems_by_id, in_flight, wait)
        self._keys = BatchedLookup(self._systems_by_key, in_flight, wait)
        self._organizations = BatchedLookup(self._organizations_by_id, in_flight, wait)
        self._trees = BatchedLookup(self._systems_in_tree_by_id, in_flight, wait)
        self._trees_and_callers = BatchedLookup(self._systems_in_tree_and_callers, in_flight, wait)
        self._case_twins = CaseTwinScanner(
            self._scan_case_twins, config.case_scan_seconds, self._scanned
        )

    async def start(self) -> None:
        # min_size=0: start-up never connects; a database that is down makes the
        # gateway unready and its requests 503, it does not stop it from starting.
        self._pool = await asyncpg.create_pool(
            self._config.dsn,
            min_size=0,
            max_size=self._config.pool_size,
            timeout=self._timeout,  # connect
            # No command_timeout: _fetch's own bound covers the query (a second timer on
            # every query otherwise); the server's statement_timeout comes first anyway.
            max_inactive_connection_lifetime=60,
            # asyncpg's default reset on release is a round trip of its own (advisory
            # unlocks, CLOSE ALL, UNLISTEN, RESET ALL) on every lookup: these connections
            # only ever run read-only SELECTs and change no session state, so there is
            # nothing to reset (an open transaction would still be rolled back).
            reset=_nothing_to_reset,
            server_settings={
                "application_name": "backup-gateway",
                "statement_timeout": str(int(self._timeout * 1000)),
                "default_transaction_read_only": "on",
                # Every lookup query is a prepared statement whose parameters are
                # arrays: left to itself the server finds a plan for one element cheaper
                # than the generic one and plans every execution anew (0.26 ms of its CPU
                # on a cold tree lookup whose execution takes 0.09 ms). The generic plans
                # probe the platform's indexes (tested), so plan once per connection.
                "plan_cache_mode": "force_generic_plan",
            },
        )
        self._case_twins.start()

    async def close(self) -> None:
        await self._case_twins.close()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            if self._releasing:
                await asyncio.wait(self._releasing, timeout=5)
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (TimeoutError, *_UNAVAILABLE):
                pool.terminate()

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        pool = self._pool
        if pool is None:
            raise DirectoryUnavailable("directory not started")
        try:
            # One bound for the pool wait and the query together, the client's own past
            # the server's statement_timeout. No timeout of asyncpg's own for the wait: it
            # would run the wait in a task of its own, a turn of the loop more per lookup.
            async with asyncio.timeout(self._timeout + 1):
                connection = await pool.acquire()
                try:
                    rows = await connection.fetch(query, *args)
                finally:
                    # The answer does not wait for the connection to go back: asyncpg's
                    # release is a shielded task, two more turns of the loop.
                    self._release_soon(pool, connection)
        except _UNAVAILABLE as exc:
            raise DirectoryUnavailable(described_failure(exc, self._config.dsn)) from None
        return list(rows)

    def _release_soon(self, pool: asyncpg.Pool, connection: Any) -> None:
        release = asyncio.ensure_future(pool.release(connection))
        self._releasing.add(release)
        release.add_done_callback(self._released)

    def _released(self, release: asyncio.Task[None]) -> None:
        self._releasing.discard(release)
        if not release.cancelled() and (exc := release.exception()) is not None:
            log.warning("postgres: a connection was not returned to the pool: %r", exc)

    async def system(self, system_id: str) -> System | None:
        if not SAFE_COMPONENT.fullmatch(system_id):
            return None  # no such id can exist; nothing to ask
        return await self._one("system", self._systems, system_id)

    async def system_by_key(self, system_key: str) -> System | None:
        if not SAFE_COMPONENT.fullmatch(system_key):
            return None  # never a folder name: no backups can be stored under it
        return await self._one("system_by_key", self._keys, system_key)

    async def organization(self, organization_id: str) -> Organization | None:
        if organization_id == self._owner.id:
            return self._owner
        if not SAFE_COMPONENT.fullmatch(organization_id):
            return None
        return await self._one("organization", self._organizations, organization_id)

    async def system_in_tree(self, system_id: str) -> SystemInTree | None:
        if not SAFE_COMPONENT.fullmatch(system_id):
            return None
        return await self._one("system_in_tree", self._trees, system_id)

    async def system_in_tree_and_organization(
        self, system_id: str, organization_id: str
    ) -> tuple[SystemInTree | None, Organization | None]:
        if organization_id == self._owner.id or not SAFE_COMPONENT.fullmatch(organization_id):
            return await super().system_in_tree_and_organization(system_id, organization_id)
        if not SAFE_COMPONENT.fullmatch(system_id):
            return None, None
        answer = await self._one(
            "system_in_tree_and_organization",
            self._trees_and_callers,
            (system_id, organization_id),
        )
        if answer is None:
            return None, None
        tree, organization = answer
        return tree, None if tree.system.deleted else organization

    def local_organization(self, organization_id: str) -> Organization | None:
        return self._owner if organization_id == self._owner.id else None

    async def reachable_systems(self, acting: Organization) -> AsyncIterator[list[System]]:
        if acting.deleted or acting.role not in ("owner", *_REACHING_ROLES):
            return
        twins = await self._twins()
        if acting.role == "owner":
            rows = self._stream(_OWNER_REACH)
        else:
            rows = self._stream(_REACH, acting.id, acting.role)
        async for batch in rows:
            systems = (_system(row, twins) for row in batch)
            yield [system for system in systems if system is not None]

    async def registered_systems(self) -> AsyncIterator[list[System]]:
        async for batch in self._stream(_REGISTERED):
            yield [
                System(
                    id=row["id"],
                    organization_id=row["organization_id"],
                    system_key=row["system_key"],
                    deleted=row["deleted"],
                )
                for row in batch
            ]

    async def maps_folder_now(self, organization_id: str, system_key: str) -> bool:
        rows = await self._fetch(_MAPS_FOLDER, system_key, organization_id)
        return bool(rows[0][0])

    async def _twins(self) -> CaseTwins:
        twins = self._case_twins.trusted()
        if twins is None:
            try:
                async with asyncio.timeout(self._timeout + 1):
                    twins = await self._case_twins.current()
            except TimeoutError:
                raise DirectoryUnavailable("postgres: no case scan within the bound") from None
        return twins

    async def _stream(self, query: str, *args: Any) -> AsyncIterator[list[asyncpg.Record]]:
        """The rows of one query in batches, through a server-side cursor in a read-only
        transaction: the whole answer is never held at once. Each step is bounded as a
        lookup is; a failure is DirectoryUnavailable, whatever was handed over before."""
        pool = self._pool
        if pool is None:
            raise DirectoryUnavailable("directory not started")
        try:
            async with asyncio.timeout(self._timeout + 1):
                connection = await pool.acquire()
        except _UNAVAILABLE as exc:
            raise DirectoryUnavailable(described_failure(exc, self._config.dsn)) from None
        transaction = connection.transaction(readonly=True)
        try:
            try:
                async with asyncio.timeout(self._timeout + 1):
                    await transaction.start()
                    cursor = await connection.cursor(query, *args)
                while True:
                    async with asyncio.timeout(self._timeout + 1):
                        rows = await cursor.fetch(_STREAM_BATCH)
                    if rows:
                        yield rows
                    if len(rows) < _STREAM_BATCH:
                        return
            except _UNAVAILABLE as exc:
                raise DirectoryUnavailable(described_failure(exc, self._config.dsn)) from None
        finally:
            with contextlib.suppress(*_UNAVAILABLE):
                async with asyncio.timeout(self._timeout + 1):
                    await transaction.rollback()
            self._release_soon(pool, connection)

    async def _one(self, name: str, lookup: BatchedLookup[K, V], key: K) -> V | None:
        started = time.perf_counter()
        outcome = "unavailable"
        try:
            # bounded: by _fetch's bound (and the case scan's) when it goes out at once, by
            # the batcher's when it waits for a query to take it
            answer = await lookup.get(key)
            outcome = "not_found" if answer is None else "found"
            return answer
        except TimeoutError:
            raise DirectoryUnavailable("postgres: no answer within the bound") from None
        except asyncio.CancelledError:
            outcome = "cancelled"  # the caller went away; the query goes on for the others
            raise
        finally:
            if self._metrics is not None:
                self._metrics.directory_lookup(name, outcome, time.perf_counter() - started)

    def export_metrics(self, metrics: Metrics) -> None:
        self._metrics = metrics
        metrics.add_reading(
            "gauge",
            "gateway_directory_case_twins",
            "Folder names (system keys, organization ids) that differ from another only in "
            "case, in the latest scan: their systems are refused",
            self._case_twins.twins_found,
        )
        metrics.add_reading(
            "gauge",
            "gateway_directory_case_scan_age_seconds",
            "Seconds since the latest case scan that answered",
            self._case_twins.age,
        )

    async def _checked_rows(
        self, query: str, *keys: list[str]
    ) -> tuple[CaseTwins, list[asyncpg.Record]]:
        twins = self._case_twins.trusted()
        if twins is None:  # only at start-up, or once scans have failed for a while
            try:
                async with asyncio.timeout(self._timeout + 1):
                    twins = await self._case_twins.current()
            except TimeoutError:
                raise DirectoryUnavailable("postgres: no case scan within the bound") from None
        return twins, await self._fetch(query, *keys)

    async def _systems_by_id(self, ids: list[str]) -> dict[str, System]:
        twins, rows = await self._checked_rows(_SYSTEMS_BY_ID, ids)
        systems = ((row["id"], _system(row, twins)) for row in rows)
        return {system_id: system for system_id, system in systems if system is not None}

    async def _systems_by_key(self, keys: list[str]) -> dict[str, System]:
        twins, rows = await self._checked_rows(_SYSTEMS_BY_KEY, keys)
        systems = ((row["raw_key"], _system(row, twins)) for row in rows)
        return {key: system for key, system in systems if system is not None}

    async def _organizations_by_id(self, ids: list[str]) -> dict[str, Organization]:
        return _live_organizations(await self._fetch(_ORGANIZATIONS, ids))

    async def _systems_in_tree_by_id(self, ids: list[str]) -> dict[str, SystemInTree]:
        twins, rows = await self._checked_rows(_SYSTEMS_IN_TREE, ids)
        by_system: dict[str, list[asyncpg.Record]] = {}
        for row in rows:
            by_system.setdefault(row["id"], []).append(row)
        trees = ((i, self._tree(same, twins)) for i, same in by_system.items())
        return {system_id: tree for system_id, tree in trees if tree is not None}

    async def _systems_in_tree_and_callers(
        self, pairs: list[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[SystemInTree, Organization | None]]:
        systems, callers = [system for system, _ in pairs], [caller for _, caller in pairs]
        twins, rows = await self._checked_rows(_SYSTEMS_IN_TREE_AND_CALLERS, systems, callers)
        by_pair: dict[tuple[str, str], list[asyncpg.Record]] = {}
        for row in rows:
            by_pair.setdefault((row["id"], row["caller_id"]), []).append(row)
        answers = {}
        for (system_id, caller_id), same in by_pair.items():
            tree = self._tree(same, twins)
            if tree is not None:
                variants = {(r["caller_role"], r["caller_parent"]) for r in same}
                answers[system_id, caller_id] = (tree, _only_one(caller_id, variants))
        return answers

    def _tree(self, rows: list[asyncpg.Record], twins: CaseTwins) -> SystemInTree | None:
        """The system of these rows (all of one system) in its tree; None when refused."""
        system = _system(rows[0], twins)
        if system is None:
            return None
        organization, creator = self._tree_of(system.organization_id, rows)
        return SystemInTree(system, organization, creator)

    def _tree_of(
        self, organization_id: str, rows: list[asyncpg.Record]
    ) -> tuple[Organization | None, Organization | None]:
        """The system's organization and its creator, from the rows of one system."""
        if organization_id == self._owner.id:
            return self._owner, None  # in no table: from the config
        organization = _only_one(
            organization_id,
            {(r["organization_role"], r["organization_parent"]) for r in rows},
        )
        parent = None if organization is None else organization.parent
        if parent is None or not SAFE_COMPONENT.fullmatch(parent):
            return organization, None  # as organization() answers for such an id
        if parent == self._owner.id:
            return organization, self._owner
        creator = _only_one(parent, {(r["creator_role"], r["creator_parent"]) for r in rows})
        return organization, creator

    async def check_ready(self) -> None:
        await self._fetch("SELECT 1")
        try:
            async with asyncio.timeout(self._timeout + 1):
                await self._case_twins.current()
        except TimeoutError:
            raise DirectoryUnavailable("postgres: no recent case scan") from None

    def reload_now(self) -> None:
        self._case_twins.rescan_now()

    async def _scan_case_twins(self) -> CaseTwins:
        # A connection of its own, outside the pool: the scan never takes a lookup's
        # connection, and it may take longer than a lookup (up to the time between scans).
        timeout = max(self._config.case_scan_seconds, self._timeout)
        try:
            async with asyncio.timeout(timeout + 1):
                connection = await asyncpg.connect(
                    self._config.dsn,
                    timeout=self._timeout,
                    server_settings={
                        "application_name": "backup-gateway case scan",
                        "statement_timeout": str(int(timeout * 1000)),
                        "default_transaction_read_only": "on",
                    },
                )
                try:
                    rows = await connection.fetch(_CASE_TWINS, self._owner.id)
                except BaseException:
                    connection.terminate()
                    raise
                await connection.close(timeout=self._timeout)
        except _UNAVAILABLE as exc:
            raise DirectoryUnavailable(described_failure(exc, self._config.dsn)) from None
        folded: dict[str, set[str]] = {"system_key": set(), "organization_id": set()}
        for row in rows:
            folded[row["kind"]].add(row["folded"])
        return CaseTwins(frozenset(folded["system_key"]), frozenset(folded["organization_id"]))

    def _scanned(self, outcome: str, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.directory_lookup("case_scan", outcome, seconds)


def _system(row: asyncpg.Record, twins: CaseTwins) -> System | None:
    system_id = row["id"]
    org_id, key = row["organization_id"], row["system_key"]
    unsafe = [
        name
        for name, value in (("organization_id", org_id), ("system_key", key))
        if value is not None and not SAFE_COMPONENT.fullmatch(value)
    ]
    if unsafe:
        log.error("system %s refused: its %s is not a safe path component", system_id, unsafe[0])
        return None
    # the raw key: an unregistered system's key still names its folder once registered
    refused = twins.refuses(org_id, row["raw_key"])
    if refused is not None:
        log.error(
            "system %s refused: its %s differs from another only in case "
            "(one folder on a case-insensitive disk)",
            system_id,
            refused,
        )
        return None
    return System(
        id=system_id,
        organization_id=org_id,
        system_key=key,
        deleted=row["deleted"],
        suspended=row["suspended"],
        secret_public=row["system_secret_public"],
        secret_sha256=row["system_secret_sha256"],
    )


def _live_organizations(rows: list[asyncpg.Record]) -> dict[str, Organization]:
    """The organizations of these rows by id (one row each, or refused by `_only_one`)."""
    live: dict[str, set[tuple[str | None, str | None]]] = {}
    for row in rows:
        live.setdefault(row["logto_id"], set()).add((row["role"], row["parent"]))
    found = ((i, _only_one(i, variants)) for i, variants in live.items())
    return {i: organization for i, organization in found if organization is not None}


def _only_one(
    organization_id: str, variants: set[tuple[str | None, str | None]]
) -> Organization | None:
    """The organization of its (role, parent) rows; none (a role of None: a join that found
    nothing) is not found, and more than one is a data error: refused."""
    variants.discard((None, None))
    if len(variants) > 1:
        log.error(
            "organization %s refused: live in %d organization tables",
            organization_id,
            len(variants),
        )
        return None
    if not variants:
        return None
    role, parent = variants.pop()
    assert role is not None  # a live row's role is its table's
    return Organization(id=organization_id, role=role, parent=parent)
