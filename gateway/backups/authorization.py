"""Object-level authorization: may this caller act on that system? (DESIGN.md §3)

Decided on the system's current owning organization. Soft-deleted
organizations are cut out of the tree: nothing is reached through them.
"""

from __future__ import annotations

from aiohttp import web

from ..directory import DIRECTORY, Directory, Organization, System
from ..http.errors import ApiError
from ..identity.principal import PRINCIPAL, Principal


async def authorized_system(request: web.Request, system_id: str) -> System:
    """The live system the caller may act on (404 system not found / 403 access denied)."""
    system = await request.app[DIRECTORY].system(system_id)
    if system is None or system.deleted:
        raise ApiError(404, "system not found")
    if not await may_act_on(request.app[DIRECTORY], request[PRINCIPAL], system):
        raise ApiError(403, "access denied to system")
    return system


async def may_act_on(directory: Directory, caller: Principal, system: System) -> bool:
    acting = await directory.organization(caller.organization_id)
    # The token's role claim must agree with the directory: a stale or forged claim never widens.
    if acting is None or acting.deleted or acting.role != caller.org_role:
        return False
    if acting.role == "owner":
        return True
    target = await directory.organization(system.organization_id)
    if target is None or target.deleted:
        return False
    if target.id == acting.id:
        return True
    if acting.role == "customer":
        return False
    if target.parent == acting.id:
        return _created_by(acting, target)
    if acting.role == "distributor" and target.role == "customer" and target.parent is not None:
        reseller = await directory.organization(target.parent)
        return (
            reseller is not None
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
