"""Authentication middleware: a verified principal with the route's permission, or 401/403."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from ..identity.principal import PRINCIPAL
from ..identity.revocation import REVOCATION, RevocationUnavailable, TokenRevoked
from ..identity.tokens import VERIFIER, InvalidToken
from .errors import ApiError, invalid_token
from .middlewares import REQUEST_ID

log = logging.getLogger(__name__)

# route name -> permission the caller needs; routes not listed are public
PROTECTED_ROUTES = web.AppKey("protected_routes", dict[str, str])


def bearer_token(request: web.Request) -> str | None:
    values = request.headers.getall("Authorization", [])
    if len(values) != 1:
        return None  # none, or ambiguous duplicates
    scheme, _, token = values[0].partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Requests that match no route (404/405) never reach auth.
    if request.match_info.http_exception is not None:
        return await handler(request)
    permission = request.app[PROTECTED_ROUTES].get(request.match_info.route.name or "")
    if permission is None:
        return await handler(request)
    token = bearer_token(request)
    if token is None:
        raise invalid_token()
    try:
        principal = request.app[VERIFIER].verify(token)
    except InvalidToken as exc:
        # at info: an expired token and a garbage one answer alike, and the operator (or
        # the user asking why) needs the difference; the request id ties it to the answer
        log.info(
            "token refused: %s",
            exc.reason,
            extra={
                "fields": {
                    "request_id": request.get(REQUEST_ID),
                    "reason": exc.reason,
                    "detail": str(exc),
                }
            },
        )
        raise invalid_token() from None
    revocation = request.app.get(REVOCATION)
    if revocation is not None:
        try:
            await revocation.check(token, principal)
        except TokenRevoked:
            raise ApiError(
                401, "token has been revoked", headers={"WWW-Authenticate": "Bearer"}
            ) from None
        except RevocationUnavailable as exc:
            log.warning("revocation unknown: %s", exc)
            raise ApiError(
                503, "security service unavailable", headers={"Retry-After": "1"}
            ) from None
    request[PRINCIPAL] = principal
    if not principal.can(permission):
        raise ApiError(403, "insufficient permissions")
    return await handler(request)
