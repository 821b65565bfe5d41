"""The organization hierarchy's rules (DESIGN.md §3) on the directory's values: which
systems an organization reaches. One function decides for every directory and every use —
a request's authorization (`gateway.backups.authorization`, which first holds the caller's
token to the directory) and the fleet's reach over the file directory; the PostgreSQL
directory asks the same in one query, held to this function by the hierarchy tests."""

from __future__ import annotations

from .base import Organization, SystemInTree


def reaches(acting: Organization, tree: SystemInTree | None) -> bool:
    """May the live organization `acting` act on the system? `tree`: the system in its
    tree (None: not asked, which only the Owner needs)."""
    if acting.deleted:
        return False
    if acting.role == "owner":
        return True
    if tree is None:
        return False  # never for a live organization other than the Owner: nothing to decide on
    target, creator = tree.organization, tree.creator
    if target is None or target.deleted or target.id != tree.system.organization_id:
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
