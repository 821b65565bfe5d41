"""Object-level authorization: may this caller act on that system? (DESIGN.md §3)

Decided on the system's current owning organization. Soft-deleted
organizations are cut out of the tree: nothing is reached through them.
"""

from __future__ import annotations

import logging

from aiohttp import web

from ..directory import DIRECTORY, Directory, DirectoryUnavailable, Organization, System
from ..http.errors import ApiError, directory_unavailable
from ..identity.principal import PRINCIPAL, Principal

log = logging.getLogger(__name__)


async def authorized_system(request: web.Request, system_id: str) -> System:
    """The live system the caller may act on (404 system not found / 403 access denied),
    or 503 when the directory cannot answer (never a stale allow)."""
    directory = request.app[DIRECTORY]
    caller = request[PRINCIPAL]
    try:
        # The caller's organization is asked with the system, not after it (one round trip
        # to a database, not two); its answer matters only once the system is found.
        system, acting = await directory.system_and_organization(system_id, caller.organization_id)
        if system is None or system.deleted:
            raise ApiError(404, "system not found")
        allowed = await may_act_on(directory, caller, acting, system)
    except DirectoryUnavailable as exc:
        log.warning("directory unavailable: %s", exc)
        raise directory_unavailable() from None
    if not allowed:
        raise ApiError(403, "access denied to system")
    return system


async def may_act_on(
    directory: Directory, caller: Principal, acting: Organization | None, system: System
) -> bool:
    """May `caller`, of the organization `acting` (as the directory answers it), act on
    `system`?"""
    # The token's role claim must agree with the directory: a stale or forged claim never widens.
    if acting is None or acting.deleted or acting.role != caller.org_role:
        return False
    if acting.role == "owner":
        return True
    # the system's organization and its creator together: a distributor reaches its
    # resellers' customers through the reseller
    target, creator = await directory.organization_and_parent(system.organization_id)
    if target is None or target.deleted:
        return False
    if target.id == acting.id:
        return True
    if acting.role == "customer":
        return False
    if target.parent == acting.id:
        return _created_by(acting, target)
    if acting.role == "distributor" and target.role == "customer" and target.parent is not None:
        reseller = creator
        return (
            reseller is not None
            and reseller.id == target.parent
            and not reseller.deleted
            and reseller.role == "reseller"
            and reseller.parent == acting.id
        )
    return False


def _created_by(acting: Organization, target: Organization) -> bool:
    if acting.role == "distributor":
        return target.role in ("reseller", "customer")
    if acting.role == "reseller":
        return target.role == "customer"
    return False
