"""Object-level authorization: may this caller act on that system? (DESIGN.md §3)

Decided on the system's current owning organization. Soft-deleted
organizations are cut out of the tree: nothing is reached through them.
"""

from __future__ import annotations

from aiohttp import web

from ..directory import DIRECTORY, Organization, System, SystemInTree
from ..directory.hierarchy import reaches
from ..http.errors import ApiError
from ..identity.principal import PRINCIPAL, Principal
from .directory_answer import directory_or_503


async def authorized_system(request: web.Request, system_id: str) -> System:
    """The live system the caller may act on (404 system not found / 403 access denied),
    or 503 when the directory cannot answer (never a stale allow)."""
    directory = request.app[DIRECTORY]
    caller = request[PRINCIPAL]
    with directory_or_503():
        # One round trip to a database at most: the caller's organization is asked beside
        # the system, and for any caller but the Owner the system comes with its
        # organization and that one's creator. The claim only picks the questions: the
        # answer decides (a claim the directory does not bear out is refused below).
        tree: SystemInTree | None = None
        if caller.org_role == "owner":
            system, acting = await directory.system_and_organization(
                system_id, caller.organization_id
            )
        else:
            tree, acting = await directory.system_in_tree_and_organization(
                system_id, caller.organization_id
            )
            system = None if tree is None else tree.system
    if system is None or system.deleted:
        raise ApiError(404, "system not found")
    if not may_act_on(caller, acting, tree):
        raise ApiError(403, "access denied to system")
    return system


def may_act_on(caller: Principal, acting: Organization | None, tree: SystemInTree | None) -> bool:
    """May `caller`, of the organization `acting` (as the directory answers it), act on the
    system? `tree`: the system in its tree (None: not asked, for the Owner's claim)."""
    # The token's role claim must agree with the directory: a stale or forged claim never widens.
    if acting is None or acting.deleted or acting.role != caller.org_role:
        return False
    return reaches(acting, tree)
