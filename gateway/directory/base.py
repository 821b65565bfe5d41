"""The directory's interface and values: organizations, systems, and the errors of loading them."""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from ..telemetry.metrics import Metrics

ROLES = ("owner", "distributor", "reseller", "customer")
# Who may have created whom: the platform's tree is owner -> distributors -> resellers -> customers.
ALLOWED_PARENT_ROLES: dict[str, frozenset[str]] = {
    "owner": frozenset(),
    "distributor": frozenset({"owner"}),
    "reseller": frozenset({"owner", "distributor"}),
    "customer": frozenset({"owner", "distributor", "reseller"}),
}
SAFE_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)


@dataclass(frozen=True, slots=True)
class Organization:
    id: str
    role: str
    parent: str | None = None
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class System:
    id: str
    organization_id: str
    system_key: str | None = None  # None: not registered, so no backups
    deleted: bool = False
    suspended: bool = False  # refuses uploads only; reads and deletes go on
    # the appliance's credentials in the platform's format (DESIGN.md §9)
    secret_public: str | None = None
    secret_sha256: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class SystemInTree:
    """A system, its organization and the organization that created that one: what deciding
    on a caller other than the Owner takes. Each organization as `Directory.organization`
    answers it (None: not found, or no creator)."""

    system: System
    organization: Organization | None
    creator: Organization | None


class DirectoryError(Exception):
    """The directory cannot be loaded; the message names the entry and the problem."""


class DirectoryUnavailable(Exception):
    """The directory cannot answer now (database down, slow, pool exhausted): a 503.

    The message is for logs only."""


class Directory(abc.ABC):
    """Read access to organizations and systems.

    Implementations answer None for what does not exist, and raise DirectoryUnavailable
    (never a stale answer) when they cannot tell."""

    @abc.abstractmethod
    async def system(self, system_id: str) -> System | None: ...

    @abc.abstractmethod
    async def organization(self, organization_id: str) -> Organization | None: ...

    @abc.abstractmethod
    async def system_by_key(self, system_key: str) -> System | None:
        """The registered system with that key (deleted or not: the caller decides), for
        the appliance's own credentials."""

    async def system_in_tree(self, system_id: str) -> SystemInTree | None:
        """The system (None when not found) with its organization and the one that created
        that, each as `organization` answers it; a directory that asks a server asks for
        all three in one query."""
        system = await self.system(system_id)
        if system is None:
            return None
        organization = await self.organization(system.organization_id)
        creator = None
        if organization is not None and organization.parent is not None:
            creator = await self.organization(organization.parent)
        return SystemInTree(system, organization, creator)

    async def system_and_organization(
        self, system_id: str, organization_id: str
    ) -> tuple[System | None, Organization | None]:
        """`system(system_id)` and `organization(organization_id)`; the organization is
        None when the system is not found or deleted (its answer does not matter then). A
        directory that asks a server asks both at once."""
        system = await self.system(system_id)
        if system is None or system.deleted:
            return system, None
        return system, await self.organization(organization_id)

    async def system_in_tree_and_organization(
        self, system_id: str, organization_id: str
    ) -> tuple[SystemInTree | None, Organization | None]:
        """`system_in_tree(system_id)` and `organization(organization_id)`, as
        `system_and_organization` answers its two."""
        tree = await self.system_in_tree(system_id)
        if tree is None or tree.system.deleted:
            return tree, None
        return tree, await self.organization(organization_id)

    def reachable_systems(self, acting: Organization) -> AsyncIterator[list[System]]:
        """Every live, registered system the organization `acting` reaches by DESIGN.md
        §3's rules (the fleet, §13), in batches, by id in code-point order. `acting` is the
        caller's organization as `organization` answers it, its role already held to the
        token's claim. DirectoryUnavailable may end it part-way."""
        raise NotImplementedError(f"{type(self).__name__} cannot list a reach")

    def registered_systems(self) -> AsyncIterator[list[System]]:
        """Every system with a registered key, soft-deleted ones included (each still maps
        its folder: its backups stay for a restore), in batches, in no particular order."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its systems")

    async def maps_folder_now(self, organization_id: str, system_key: str) -> bool:
        """Whether a registered system (live or soft-deleted) has this organization and key,
        asked of the source itself now: never from a cache, never from a file version older
        than this call (a purge asks it right before it deletes)."""
        system = await self.system_by_key(system_key)
        return system is not None and system.organization_id == organization_id

    def local_organization(self, organization_id: str) -> Organization | None:
        """The organization when this directory knows it without asking anyone (the Owner,
        from the config), else None: a cache need not ask it in a task of its own."""
        return None

    async def start(self) -> None:
        """Acquire what the directory needs to answer (pools, reload tasks); no I/O needed."""

    async def close(self) -> None:
        """Release what `start` acquired."""

    async def check_ready(self) -> None:
        """Raise DirectoryUnavailable when the directory cannot answer now."""

    def reload_now(self) -> None:
        """Drop what is held and read afresh (SIGHUP); by default nothing is held."""

    def export_metrics(self, metrics: Metrics) -> None:
        """Register what this directory counts itself (reload failures, ...)."""


DIRECTORY = web.AppKey("directory", Directory)
