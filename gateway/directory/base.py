"""The directory's interface and values: organizations, systems, and the errors of loading them."""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass

from aiohttp import web

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
    system_key: str | None = None
    deleted: bool = False


class DirectoryError(Exception):
    """The directory cannot be loaded; the message names the entry and the problem."""


class Directory(abc.ABC):
    """Read access to organizations and systems."""

    @abc.abstractmethod
    async def system(self, system_id: str) -> System | None: ...

    @abc.abstractmethod
    async def organization(self, organization_id: str) -> Organization | None: ...

    async def check_ready(self) -> None:
        """Raise when the directory cannot answer; the file directory always can."""


DIRECTORY = web.AppKey("directory", Directory)
