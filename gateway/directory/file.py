"""The embedded directory: a YAML file, validated whole when it loads, reloaded when it changes.

A change takes effect within `directory.reload_seconds` (at once on SIGHUP): the file is
parsed and validated off the event loop and swapped in whole, in one assignment, so a
request sees either the old directory or the new one. A file that fails validation, or has
gone missing, leaves the last good one in service; each bad version is logged once (one
line naming the entry or the YAML line) and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from ..config_loader import YamlFileError, read_yaml_file
from ..telemetry.metrics import Metrics
from .base import (
    ALLOWED_PARENT_ROLES,
    ROLES,
    SAFE_COMPONENT,
    Directory,
    DirectoryError,
    DirectoryUnavailable,
    Organization,
    System,
    SystemInTree,
)
from .hierarchy import reaches

log = logging.getLogger(__name__)
_SECRET_PUBLIC = re.compile(r"[A-Za-z0-9]{1,128}", re.ASCII)
_SECRET_SHA256 = re.compile(r"[0-9a-f]{2,128}:[0-9a-f]{64}", re.ASCII)
_BATCH = 1000  # systems of a reach handed over at once


class InMemoryDirectory(Directory):
    """A validated, immutable snapshot. The file directory is one of these."""

    def __init__(self, organizations: list[Organization], systems: list[System]) -> None:
        self._organizations = {o.id: o for o in organizations}
        self._systems = {s.id: s for s in systems}
        self._by_key = {s.system_key: s for s in systems if s.system_key is not None}
        # live and registered, by id, and the same by organization: made once, on first use
        self._served: list[System] | None = None
        self._served_by_organization: dict[str, list[System]] = {}
        self._children: dict[str, list[str]] = {}

    async def reachable_systems(self, acting: Organization) -> AsyncIterator[list[System]]:
        """The reach in id order, read from the organizations it can hold (the caller's,
        its children's, its grandchildren's) rather than from every system: a customer's
        page costs its own systems, not the directory's. `reaches` still decides each."""
        batch: list[System] = []
        for system in self._candidates(acting):
            if reaches(acting, self._tree(system)):
                batch.append(system)
                if len(batch) >= _BATCH:
                    yield batch
                    batch = []
                    await asyncio.sleep(0)  # a whole reach is walked: let others in between
        if batch:
            yield batch

    def _candidates(self, acting: Organization) -> Iterator[System]:
        if self._served is None:
            self._index_served()
        assert self._served is not None
        if acting.role == "owner":
            return iter(self._served)
        # §3: an organization reaches no deeper than its children's children
        within = {acting.id}
        for child in self._children.get(acting.id, ()):
            within.add(child)
            within.update(self._children.get(child, ()))
        lists = [self._served_by_organization.get(o, []) for o in within]
        return heapq.merge(*lists, key=lambda s: s.id)

    def _index_served(self) -> None:
        served = sorted(
            (s for s in self._systems.values() if not s.deleted and s.system_key),
            key=lambda s: s.id,
        )
        for system in served:
            self._served_by_organization.setdefault(system.organization_id, []).append(system)
        for organization in self._organizations.values():
            if organization.parent is not None:
                self._children.setdefault(organization.parent, []).append(organization.id)
        self._served = served

    def _tree(self, system: System) -> SystemInTree:
        organization = self._organizations.get(system.organization_id)
        parent = organization.parent if organization is not None else None
        creator = self._organizations.get(parent) if parent is not None else None
        return SystemInTree(system, organization, creator)

    async def registered_systems(self) -> AsyncIterator[list[System]]:
        yield list(self._by_key.values())

    async def system(self, system_id: str) -> System | None:
        return self._systems.get(system_id)

    async def system_by_key(self, system_key: str) -> System | None:
        return self._by_key.get(system_key)

    async def organization(self, organization_id: str) -> Organization | None:
        return self._organizations.get(organization_id)

    @property
    def organizations(self) -> list[Organization]:
        return list(self._organizations.values())

    @property
    def systems(self) -> list[System]:
        return list(self._systems.values())


class FileDirectory(Directory):
    """The YAML file's directory, reloaded in the background while the app runs."""

    def __init__(self, path: Path, reload_seconds: float) -> None:
        self._path = path
        self._interval = reload_seconds
        self._seen = _signature(path)  # the version in service (or last refused)
        self._in_service = self._seen
        self._current = load_file_directory(path)  # a broken file fails start-up
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reload_failures = 0

    async def system(self, system_id: str) -> System | None:
        return await self._current.system(system_id)

    async def organization(self, organization_id: str) -> Organization | None:
        return await self._current.organization(organization_id)

    async def system_by_key(self, system_key: str) -> System | None:
        return await self._current.system_by_key(system_key)

    def reachable_systems(self, acting: Organization) -> AsyncIterator[list[System]]:
        return self._current.reachable_systems(acting)

    def registered_systems(self) -> AsyncIterator[list[System]]:
        return self._current.registered_systems()

    async def maps_folder_now(self, organization_id: str, system_key: str) -> bool:
        # the file as it is now, not as the last reload found it; a version that was
        # refused may map the folder: no answer, rather than a guess
        await self.check_for_change()
        if self._seen != self._in_service:
            raise DirectoryUnavailable("the directory file on disk is not the one in service")
        return await self._current.maps_folder_now(organization_id, system_key)

    @property
    def current(self) -> InMemoryDirectory:
        return self._current

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._watch(), name="directory-reload")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def export_metrics(self, metrics: Metrics) -> None:
        metrics.add_reading(
            "counter",
            "gateway_directory_reload_failures",
            "Versions of the directory file refused on reload (the last good one stayed)",
            lambda: self.reload_failures,
        )

    def reload_now(self) -> None:
        """Look for a change at once (SIGHUP)."""
        self._wake.set()

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.check_for_change()
            except Exception as exc:
                # Whatever a version of the file does to the loader, the last good directory
                # stays in service and the next good version is still applied.
                self.reload_failures += 1
                log.error(
                    "directory not reloaded, the last good one stays in service: %s: %s",
                    type(exc).__name__,
                    exc,
                )

    async def check_ready(self) -> None:
        """Unready when the reload task is not running: changes would never be applied."""
        if self._task is not None and self._task.done():
            raise DirectoryUnavailable("the directory file's reload task is not running")

    async def check_for_change(self) -> bool:
        """Reload when the file changed; True when a new version went into service."""
        signature = await asyncio.to_thread(_signature, self._path)
        if signature == self._seen:
            return False
        self._seen = signature
        try:
            if signature is None:
                raise DirectoryError(f"directory file {self._path} has gone missing")
            fresh = await asyncio.to_thread(load_file_directory, self._path)
        except DirectoryError as exc:
            self.reload_failures += 1
            log.error("directory not reloaded, the last good one stays in service: %s", exc)
            return False
        self._current = fresh
        self._in_service = signature
        log.info(
            "directory reloaded",
            extra={
                "fields": {
                    "organizations": len(fresh.organizations),
                    "systems": len(fresh.systems),
                }
            },
        )
        return True


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when the file does: inode (an atomic rename), size, mtime and ctime."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def load_file_directory(path: Path) -> InMemoryDirectory:
    try:
        raw = read_yaml_file(path)
    except OSError as exc:
        raise DirectoryError(f"cannot read directory file {path}: {exc.strerror}") from None
    except YamlFileError as exc:
        raise DirectoryError(f"directory file {exc}") from None
    return parse_directory(raw)


def parse_directory(raw: Any) -> InMemoryDirectory:
    if not isinstance(raw, dict):
        raise DirectoryError("directory: expected a mapping with organizations and systems")
    unknown = set(raw) - {"organizations", "systems"}
    if unknown:
        raise DirectoryError(f"directory: unknown key {sorted(map(str, unknown))[0]!r}")
    organizations = [
        _organization(entry, f"organizations[{i}]")
        for i, entry in enumerate(_list(raw, "organizations"))
    ]
    systems = [_system(entry, f"systems[{i}]") for i, entry in enumerate(_list(raw, "systems"))]
    _check_organizations(organizations)
    _check_systems(systems, {o.id for o in organizations})
    return InMemoryDirectory(organizations, systems)


def _list(raw: dict[str, Any], key: str) -> list[Any]:
    value = raw.get(key) or []
    if not isinstance(value, list):
        raise DirectoryError(f"directory: {key} must be a list")
    return value


def _fields(entry: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise DirectoryError(f"{where}: expected a mapping")
    unknown = set(map(str, entry)) - allowed
    if unknown:
        raise DirectoryError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    return entry


def _component(entry: dict[str, Any], key: str, where: str, required: bool = True) -> str | None:
    value = entry.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not SAFE_COMPONENT.fullmatch(value):
        raise DirectoryError(
            f"{where}: {key} {value!r} is not a safe id "
            "(1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit)"
        )
    return value


def _flag(entry: dict[str, Any], where: str, key: str = "deleted") -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise DirectoryError(f"{where}: {key} must be true or false")
    return value


def _organization(entry: Any, where: str) -> Organization:
    entry = _fields(entry, where, {"id", "role", "parent", "deleted", "name"})
    org_id = _component(entry, "id", where)
    assert org_id is not None
    where = f"{where} ({org_id})"
    role = entry.get("role")
    if not isinstance(role, str) or role.lower() not in ROLES:
        raise DirectoryError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    parent = _component(entry, "parent", where, required=False)
    return Organization(id=org_id, role=role.lower(), parent=parent, deleted=_flag(entry, where))


def _system(entry: Any, where: str) -> System:
    entry = _fields(
        entry,
        where,
        {
            "id",
            "system_key",
            "organization_id",
            "deleted",
            "suspended",
            "name",
            "system_secret_public",
            "system_secret_sha256",
        },
    )
    system_id = _component(entry, "id", where)
    assert system_id is not None
    where = f"{where} ({system_id})"
    org_id = _component(entry, "organization_id", where)
    assert org_id is not None
    return System(
        id=system_id,
        organization_id=org_id,
        system_key=_component(entry, "system_key", where, required=False),
        deleted=_flag(entry, where),
        suspended=_flag(entry, where, "suspended"),
        secret_public=_matching(entry, "system_secret_public", _SECRET_PUBLIC, where),
        secret_sha256=_matching(entry, "system_secret_sha256", _SECRET_SHA256, where),
    )


def _matching(entry: dict[str, Any], key: str, pattern: re.Pattern[str], where: str) -> str | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise DirectoryError(f"{where}: {key} is not in the platform's format")
    return value


def _check_organizations(organizations: list[Organization]) -> None:
    by_id: dict[str, Organization] = {}
    folded: dict[str, str] = {}
    for org in organizations:
        if org.id in by_id:
            raise DirectoryError(f"organization {org.id}: duplicate id")
        by_id[org.id] = org
        # Organization ids are folder names: on a case-insensitive disk these would share one.
        other = folded.setdefault(org.id.lower(), org.id)
        if other != org.id:
            raise DirectoryError(f"organization {org.id}: id differs from {other} only in case")
    for org in organizations:
        if org.parent is not None and org.parent not in by_id:
            raise DirectoryError(f"organization {org.id}: parent {org.parent!r} is not defined")
    for org in organizations:
        seen = {org.id}
        current = org
        while current.parent is not None:
            if current.parent in seen:
                raise DirectoryError(f"organization {org.id}: parent chain has a cycle")
            seen.add(current.parent)
            current = by_id[current.parent]
    for org in organizations:
        allowed = ALLOWED_PARENT_ROLES[org.role]
        if org.parent is None:
            if allowed:
                raise DirectoryError(f"organization {org.id}: a {org.role} needs a parent")
            continue
        parent_role = by_id[org.parent].role
        if parent_role not in allowed:
            raise DirectoryError(
                f"organization {org.id}: a {org.role} cannot have a {parent_role} as parent"
            )


def _check_systems(systems: list[System], organization_ids: set[str]) -> None:
    seen_ids: set[str] = set()
    seen_keys: dict[str, str] = {}
    folded_keys: dict[str, str] = {}
    for system in systems:
        if system.id in seen_ids:
            raise DirectoryError(f"system {system.id}: duplicate id")
        seen_ids.add(system.id)
        if system.organization_id not in organization_ids:
            raise DirectoryError(
                f"system {system.id}: organization {system.organization_id!r} is not defined"
            )
        if system.system_key is not None:
            # Two systems on one key would share (and delete) each other's backups.
            other = seen_keys.setdefault(system.system_key, system.id)
            if other != system.id:
                raise DirectoryError(f"system {system.id}: system_key also used by {other}")
            # Keys are folder names: on a case-insensitive disk these would share one.
            key = folded_keys.setdefault(system.system_key.lower(), system.system_key)
            if key != system.system_key:
                raise DirectoryError(
                    f"system {system.id}: system_key differs from {key} only in case"
                )
