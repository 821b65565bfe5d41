"""An appliance's own credentials (DESIGN.md §9, §10): the one check behind its upload, its
listing, its restore and its delete — HTTP Basic `system_key:secret`, the system live,
registered and not suspended, its organization live, failures braked per address and key."""

from __future__ import annotations

from aiohttp import web

from ..directory import DIRECTORY, System
from ..http.errors import ApiError
from ..identity.appliance import CHALLENGE, basic_credentials, secret_matches
from .directory_answer import directory_or_503
from .rates import FailedLogins

FAILED_LOGINS = web.AppKey("failed_logins", FailedLogins)
INVALID = "invalid system credentials"


async def appliance(request: web.Request) -> System:
    """The live, registered, unsuspended system whose credentials these are (401 else)."""
    app = request.app
    credentials = basic_credentials(request)
    system = None
    if credentials is not None:
        with directory_or_503():
            system = await app[DIRECTORY].system_by_key(credentials.system_key)
    matches = secret_matches(
        system.secret_public if system else None,
        system.secret_sha256 if system else None,
        credentials.secret if credentials else "",
    )
    # A soft-deleted organization's appliances are refused too (asked only once the secret
    # matched: the answer costs an unknown key nothing it could time). The brake is asked
    # only after a failure: a correct credential is never refused, whoever else failed
    # from the same address (a NAT, the load balancer).
    live = matches and system is not None and not system.deleted and not system.suspended
    if live and system is not None and await _organization_live(app, system.organization_id):
        return system
    # Failures count per client address and key named: guessing one system's secret is
    # braked, while appliances behind one proxy address keep their own counts.
    attempt = f"{request.remote or ''} {credentials.system_key if credentials else ''}"
    wait = await app[FAILED_LOGINS].failed(attempt)
    if wait is not None:
        raise ApiError(
            429, "too many failed authentication attempts", None, {"Retry-After": str(wait)}
        )
    raise ApiError(401, INVALID, None, CHALLENGE)


async def _organization_live(app: web.Application, organization_id: str) -> bool:
    with directory_or_503():
        organization = await app[DIRECTORY].organization(organization_id)
    return organization is not None and not organization.deleted
