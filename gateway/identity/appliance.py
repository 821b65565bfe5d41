"""Appliances' own credentials (DESIGN.md §9): HTTP Basic `system_key:my_<public>.<secret>`.

The directory holds the public part and `hex(salt):hex(sha256(salt ‖ secret part))`, the
platform's format. Checking costs the same whether the key is known or not, and whatever
part of the secret is wrong: one salted hash and two constant-time comparisons, always.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass, field

from aiohttp import web

_SECRET = re.compile(r"my_([A-Za-z0-9]{1,128})\.([^.\s]{1,512})", re.ASCII)
# Work done for an unknown key or a malformed secret, so that it costs what a wrong one does.
_STAND_IN_PUBLIC = "0" * 16
_STAND_IN_HASH = "00" * 16 + ":" + "00" * 32
_ALPHABET = string.ascii_letters + string.digits
CHALLENGE = {"WWW-Authenticate": 'Basic realm="System Authentication"'}


@dataclass(frozen=True, slots=True)
class BasicCredentials:
    system_key: str
    secret: str = field(repr=False)


def basic_credentials(request: web.Request) -> BasicCredentials | None:
    """The one Basic credential of the request; None when absent, repeated or malformed."""
    values = request.headers.getall("Authorization", [])
    if len(values) != 1:
        return None
    scheme, _, encoded = values[0].strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        text = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    key, colon, secret = text.partition(":")
    if not colon or not key or not secret:
        return None
    return BasicCredentials(key, secret)


def secret_matches(stored_public: str | None, stored_sha256: str | None, secret: str) -> bool:
    """Whether `secret` matches the stored public part and hash (None for a system that is
    unknown or has no secret); the same work for every input."""
    parsed = _SECRET.fullmatch(secret)
    public, part = (parsed.group(1), parsed.group(2)) if parsed else ("", secret)
    known = bool(stored_public and stored_sha256)
    salt_hex, _, hash_hex = (
        stored_sha256 if known and stored_sha256 else _STAND_IN_HASH
    ).partition(":")
    try:
        salt, expected = bytes.fromhex(salt_hex), bytes.fromhex(hash_hex)
    except ValueError:
        salt, expected, known = b"", b"", False
    actual = hashlib.sha256(salt + part.encode("utf-8", "surrogatepass")).digest()
    same_hash = hmac.compare_digest(actual, expected)
    reference = stored_public if known and stored_public else _STAND_IN_PUBLIC
    same_public = hmac.compare_digest(public.encode(), reference.encode())
    return known and parsed is not None and same_hash and same_public


@dataclass(frozen=True, slots=True)
class NewSecret:
    """A freshly made appliance secret: shown once, stored only as its public part and hash."""

    secret: str = field(repr=False)  # my_<public>.<secret>
    public: str
    sha256: str  # hex(salt):hex(sha256(salt ‖ secret part))


def new_secret() -> NewSecret:
    public = "".join(secrets.choice(_ALPHABET) for _ in range(16))
    part = "".join(secrets.choice(_ALPHABET) for _ in range(40))
    salt = secrets.token_bytes(16)
    digest = hashlib.sha256(salt + part.encode()).hexdigest()
    return NewSecret(f"my_{public}.{part}", public, f"{salt.hex()}:{digest}")
