"""Access-token verification (python-jose) and minting for the `token` command.

The only module that imports python-jose (3.5.0, pinned exactly: unmaintained, with
CVE-2026-85394 — a DER public key accepted as an HMAC secret — and CVE-2026-120459 — an
empty HMAC key accepted — unfixed). Neither is reachable here: the allowed algorithms are
one family, each key is prepared for its own algorithm from PEM (public keys) or a secret
of at least 32 bytes, and the token's header never picks the key.

Verification is strict by construction: the algorithm must be on the config's
allow-list (one family), the key is chosen by the gateway, never by the
token's header (`kid`, `jku`, `x5u`, `jwk` are ignored and never fetched), and
every claim the gateway reads is type-checked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal, TypeGuard

from aiohttp import web
from jose import jwk, jws, jwt
from jose.backends.base import Key
from jose.exceptions import JOSEError

from ..config import AuthConfig
from ..config_loader import ConfigError
from .keys import hmac_secret
from .principal import MANAGE_SYSTEMS, Principal

MAX_TOKEN_BYTES = 8192
# Three base64url segments; anything else (JWE's five, padding, stray bytes) never reaches jose.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*", re.ASCII)
DEFAULT_PERMISSIONS = ("read:systems", MANAGE_SYSTEMS)


class InvalidToken(Exception):
    """Why a token was refused: `reason` says which check, the message its detail. For the
    log (at info, with the request id), never for the response: every refusal answers the
    same `invalid token`, so a caller learns nothing of which check it failed."""

    def __init__(self, detail: str, reason: Reason = "claims") -> None:
        super().__init__(detail)
        self.reason = reason


# expired and not yet valid are a clock's; signature, issuer and audience a key's or a
# deployment's; claims the token's content; malformed and algorithm its form
Reason = Literal[
    "expired",
    "not yet valid",
    "signature",
    "issuer",
    "audience",
    "claims",
    "algorithm",
    "malformed",
]


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidToken(f"duplicate JSON key {key!r}", "malformed")
        result[key] = value
    return result


# A JWT's header and claims are flat objects with a list or two: more brackets than this
# is an attack on the parser (2,000 nested arrays once raised RecursionError, a 500).
MAX_JSON_BRACKETS = 64


def _json_segment(segment: str) -> Any:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise InvalidToken(f"undecodable segment: {type(exc).__name__}", "malformed") from None
    # Bounded before parsing: nesting depth can be no more than the brackets there are.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_BRACKETS:
        raise InvalidToken("too many nested structures", "malformed")
    try:
        return json.loads(raw, object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError) as exc:
        raise InvalidToken(f"undecodable segment: {type(exc).__name__}", "malformed") from None


# Time claims are unix seconds: finite, and within what a float holds exactly.
MAX_TIME = 2**53


def _is_number(value: Any) -> TypeGuard[int | float]:
    """A time claim: an int or float, finite, between 0 and 2**53 (NaN, 1e400 and 10**400
    never expire nor compare, or overflow float())."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return 0 <= value <= MAX_TIME


def _string_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidToken(f"{name} must be a list of strings")
    return value


def verification_keys(auth: AuthConfig) -> dict[str, Key]:
    """One prepared key per allowed algorithm, so a token is only ever checked with its own."""
    if auth.is_hmac:
        material: str | bytes = hmac_secret(auth)
        field = "auth.secret"
    else:
        assert auth.public_key_file is not None
        field = "auth.public_key_file"
        try:
            material = auth.public_key_file.read_bytes()
        except OSError as exc:
            problem = f"cannot read {auth.public_key_file}: {exc.strerror}"
            raise ConfigError(field, problem) from None
        if b"PRIVATE KEY" in material:
            raise ConfigError(field, "holds a private key; give the gateway the public key only")
    keys: dict[str, Key] = {}
    for alg in auth.algorithms:
        try:
            keys[alg] = jwk.construct(material, alg)
        except (JOSEError, ValueError, TypeError) as exc:
            raise ConfigError(field, f"not a usable {alg} key ({type(exc).__name__})") from None
    return keys


class TokenVerifier:
    def __init__(
        self,
        auth: AuthConfig,
        keys: dict[str, Key] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys if keys is not None else verification_keys(auth)
        self._issuer = auth.issuer
        self._audience = auth.audience
        self._leeway = auth.leeway_seconds
        self._clock = clock
        self._cache: dict[bytes, Principal] = {}
        self._cache_size = auth.cache_size

    def verify(self, token: str) -> Principal:
        """Return the principal of a valid access token, or raise InvalidToken."""
        if len(token) > MAX_TOKEN_BYTES or not token.isascii():
            raise InvalidToken("token too long or not ASCII", "malformed")
        now = self._clock()
        digest = hashlib.blake2b(token.encode(), digest_size=20).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            if cached.expires_at + self._leeway >= now:
                return cached
            del self._cache[digest]
        principal = self._verify_uncached(token, now)
        if self._cache_size > 0:
            if len(self._cache) >= self._cache_size:
                # Drop the oldest entry; dicts keep insertion order.
                del self._cache[next(iter(self._cache))]
            self._cache[digest] = principal
        return principal

    def _verify_uncached(self, token: str, now: float) -> Principal:
        if not _COMPACT_JWS.fullmatch(token):
            raise InvalidToken(
                "not a compact JWS of base64url segments (JWE is refused too)", "malformed"
            )
        segments = token.split(".")
        header = _json_segment(segments[0])
        if not isinstance(header, dict):
            raise InvalidToken("header is not an object", "malformed")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._keys:
            raise InvalidToken(f"algorithm {alg!r} is not allowed", "algorithm")
        if "crit" in header:
            raise InvalidToken("critical header extensions are not supported", "malformed")
        try:
            jws.verify(token, self._keys[alg], algorithms=[alg])
        except JOSEError as exc:
            raise InvalidToken(f"signature: {exc}", "signature") from None
        claims = _json_segment(segments[1])
        return self._principal(claims, now)

    def _principal(self, claims: Any, now: float) -> Principal:
        if not isinstance(claims, dict):
            raise InvalidToken("claims are not an object")
        if claims.get("token_type") != "access":
            raise InvalidToken("token_type is not access")
        raw_exp = claims.get("exp")
        if not _is_number(raw_exp):
            raise InvalidToken("exp missing or not a number")
        exp = float(raw_exp)
        if now > exp + self._leeway:
            raise InvalidToken(f"expired at {exp:.0f}, now {now:.0f}", "expired")
        for name in ("nbf", "iat"):
            if name in claims and not _is_number(claims[name]):
                raise InvalidToken(f"{name} is not a number")
        if "nbf" in claims and now + self._leeway < claims["nbf"]:
            raise InvalidToken(f"not valid before {claims['nbf']}", "not yet valid")
        if self._issuer is not None and claims.get("iss") != self._issuer:
            raise InvalidToken("wrong issuer", "issuer")
        if self._audience is not None:
            aud = claims.get("aud")
            audiences = [aud] if isinstance(aud, str) else aud
            if not isinstance(audiences, list) or self._audience not in audiences:
                raise InvalidToken("wrong audience", "audience")
        user = claims.get("user")
        if not isinstance(user, dict):
            raise InvalidToken("user claim missing or not an object")
        # The platform's Owner-organization tokens carry an empty user.id and no sub.
        user_id = user.get("id", claims.get("sub", ""))
        org_id = user.get("organization_id")
        role = user.get("org_role")
        username = user.get("username")
        logto_id = user.get("logto_id")
        if not isinstance(user_id, str):
            raise InvalidToken("user id is not a string")
        if logto_id is not None and not isinstance(logto_id, str):
            raise InvalidToken("user.logto_id is not a string")
        if not isinstance(org_id, str) or not org_id:
            raise InvalidToken("user.organization_id missing")
        # An empty role is well formed (DESIGN.md §3): its caller reaches nothing, a 403 at
        # the hierarchy step as the platform answers, never a 401.
        if not isinstance(role, str):
            raise InvalidToken("user.org_role missing")
        if username is not None and not isinstance(username, str):
            raise InvalidToken("user.username is not a string")
        permissions = frozenset(
            _string_list(user.get("user_permissions"), "user.user_permissions")
            + _string_list(user.get("org_permissions"), "user.org_permissions")
        )
        return Principal(
            user_id=user_id,
            username=username,
            organization_id=org_id,
            org_role=role.lower(),
            permissions=permissions,
            expires_at=exp,
            logto_id=logto_id or None,
        )


VERIFIER = web.AppKey("verifier", TokenVerifier)


def mint_token(
    auth: AuthConfig,
    organization_id: str,
    role: str,
    permissions: tuple[str, ...] = DEFAULT_PERMISSIONS,
    ttl_seconds: int = 3600,
    user_id: str = "u_cli",
    username: str = "cli",
    now: float | None = None,
) -> str:
    """A signed access token in the platform's layout (HMAC configs only)."""
    if not auth.is_hmac:
        raise ValueError("minting needs an HMAC config; sign RS/ES tokens with the private key")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "token_type": "access",
        "sub": user_id,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl_seconds,
        "jti": str(uuid.uuid4()),
        "user": {
            "id": user_id,
            "username": username,
            "organization_id": organization_id,
            "org_role": role,
            "user_permissions": [],
            "org_permissions": list(permissions),
        },
    }
    if auth.issuer is not None:
        claims["iss"] = auth.issuer
    if auth.audience is not None:
        claims["aud"] = auth.audience
    return str(jwt.encode(claims, hmac_secret(auth), algorithm=auth.algorithms[0]))
