"""The verified caller, as read from an access token."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

MANAGE_SYSTEMS = "manage:systems"
READ_SYSTEMS = "read:systems"


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str  # empty for the platform's Owner-organization tokens
    username: str | None
    organization_id: str
    org_role: str  # lower-cased
    permissions: frozenset[str]  # user_permissions and org_permissions together
    expires_at: float
    logto_id: str | None = None  # the user's id at the platform's identity provider

    def can(self, permission: str) -> bool:
        return permission in self.permissions


PRINCIPAL = web.RequestKey("principal", Principal)
