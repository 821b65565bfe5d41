"""The digest an appliance sends with its upload, and the one a download carries (RFC 9530).

`Content-Digest` and `Repr-Digest` are Structured Field dictionaries (RFC 8941), parsed by
http-sfv. Only `sha-256` is read; members of other algorithms are ignored, so a header
with only those is no digest. A header that is not a dictionary, a `sha-256` that is not
32 bytes, or the two headers naming different `sha-256` values is malformed.
"""

from __future__ import annotations

import base64

import http_sfv
from multidict import CIMultiDictProxy

HEADERS = ("Content-Digest", "Repr-Digest")
SHA256_BYTES = 32


class InvalidDigest(ValueError):
    """The digest headers cannot be taken at their word (400 invalid digest)."""


def requested_sha256(headers: CIMultiDictProxy[str]) -> str | None:
    """The hex sha256 the client says its body has; None when it names none."""
    found: set[bytes] = set()
    for name in HEADERS:
        values = headers.getall(name, [])
        if not values:
            continue
        members = http_sfv.Dictionary()
        try:
            # a field split over several lines is one list of members (RFC 9110 §5.3)
            members.parse(", ".join(values).encode("ascii"))
        except (ValueError, UnicodeError):
            raise InvalidDigest(f"{name} is not a structured-field dictionary") from None
        member = members.get("sha-256")
        if member is None:
            continue
        value = member.value if isinstance(member, http_sfv.Item) else None
        if not isinstance(value, bytes) or len(value) != SHA256_BYTES:
            raise InvalidDigest(f"{name}: sha-256 is not {SHA256_BYTES} bytes of base64")
        found.add(value)
    if len(found) > 1:
        raise InvalidDigest("Content-Digest and Repr-Digest name different sha-256 values")
    return found.pop().hex() if found else None


def repr_digest(sha256_hex: str) -> str | None:
    """The `Repr-Digest` value for a stored sha256 (hex); None when none is known."""
    try:
        raw = bytes.fromhex(sha256_hex)
    except ValueError:
        return None
    if len(raw) != SHA256_BYTES:
        return None
    return "sha-256=:" + base64.b64encode(raw).decode("ascii") + ":"
