"""Hostile and broken tokens: each is a 401 in the envelope and deletes nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwt

from gateway.config_loader import ConfigError
from gateway.identity.tokens import TokenVerifier

from .support import (
    AUDIENCE,
    ISSUER,
    SECRET,
    LocalHarness,
    bearer,
    claims_for,
    location_for,
    make_config,
    new_backup_id,
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any] | str, claims: dict[str, Any] | str, sig: bytes = b"") -> str:
    h = header if isinstance(header, str) else json.dumps(header)
    c = claims if isinstance(claims, str) else json.dumps(claims)
    return f"{b64(h.encode())}.{b64(c.encode())}.{b64(sig)}"


def hs256(claims: Any, secret: str = SECRET, headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers=headers)


def signed_raw(header_json: str, claims_json: str, secret: str = SECRET) -> str:
    """Sign exactly these header/claims bytes (for duplicate keys and odd JSON)."""
    import hashlib
    import hmac

    signing_input = f"{b64(header_json.encode())}.{b64(claims_json.encode())}"
    sig = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def signed_raw_bytes(header_json: str, claims_json: str, key: bytes) -> str:
    """HS256 over exactly these bytes with a binary key (a DER public key, say)."""
    import hashlib
    import hmac

    signing_input = f"{b64(header_json.encode())}.{b64(claims_json.encode())}"
    return f"{signing_input}.{b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())}"


@pytest.mark.parametrize("secret", ["", "short", "x" * 31])
def test_an_empty_or_short_hmac_secret_is_a_config_error(tmp_path: Path, secret: str) -> None:
    """CVE-2026-120459: python-jose 3.5.0 accepts an empty HMAC key. The config never
    hands it one: empty or under 32 bytes stops start-up."""
    with pytest.raises(ConfigError, match="auth.secret"):
        make_config(tmp_path, auth={"secret": secret})


def user_claims(**user: Any) -> dict[str, Any]:
    claims = claims_for("org_c1")
    claims["user"].update(user)
    return claims


def without(key: str) -> dict[str, Any]:
    claims = claims_for("org_c1")
    del claims[key]
    return claims


def hostile_tokens() -> list[tuple[str, str]]:
    good = claims_for("org_c1")
    now = int(time.time())
    good_json = json.dumps(good)
    return [
        ("alg none", raw_token({"alg": "none", "typ": "JWT"}, good)),
        ("alg None", raw_token({"alg": "None", "typ": "JWT"}, good)),
        ("alg NONE", raw_token({"alg": "NONE"}, good)),
        ("alg nOnE with sig", raw_token({"alg": "nOnE"}, good, b"sig")),
        ("alg missing", raw_token({"typ": "JWT"}, good, b"sig")),
        ("HS512 not allowed", jwt.encode(good, SECRET, algorithm="HS512")),
        ("wrong secret", hs256(good, "another-secret-" + "y" * 40)),
        (
            "tampered claims",
            hs256(good).rsplit(".", 2)[0] + "." + b64(b"{}") + "." + hs256(good).rsplit(".", 1)[1],
        ),
        ("bad signature", hs256(good)[:-4] + "AAAA"),
        ("expired", hs256(claims_for("org_c1", exp=now - 3600))),
        ("expired beyond leeway", hs256(claims_for("org_c1", exp=now - 31))),
        ("not yet valid", hs256(claims_for("org_c1", nbf=now + 3600))),
        ("missing exp", hs256(without("exp"))),
        ("exp as string", hs256(claims_for("org_c1", exp=str(now + 600)))),
        ("exp as bool", hs256(claims_for("org_c1", exp=True))),
        ("nbf as string", hs256(claims_for("org_c1", nbf="0"))),
        ("refresh token", hs256(claims_for("org_c1", token_type="refresh"))),
        ("no token_type", hs256(without("token_type"))),
        ("user missing", hs256(without("user"))),
        ("user as list", hs256(claims_for("org_c1", user=["org_c1"]))),
        ("user as string", hs256(claims_for("org_c1", user="org_c1"))),
        ("org_permissions as string", hs256(user_claims(org_permissions="manage:systems"))),
        ("user_permissions as dict", hs256(user_claims(user_permissions={"manage:systems": 1}))),
        ("permission not a string", hs256(user_claims(org_permissions=[["manage:systems"]]))),
        ("organization_id missing", hs256(user_claims(organization_id=None))),
        ("organization_id as int", hs256(user_claims(organization_id=7))),
        ("org_role missing", hs256(user_claims(org_role=None))),
        ("claims as list", signed_raw('{"alg":"HS256","typ":"JWT"}', "[1,2]")),
        ("claims not json", signed_raw('{"alg":"HS256","typ":"JWT"}', "not json")),
        (
            "duplicate claim keys",
            signed_raw('{"alg":"HS256"}', good_json[:-1] + ',"token_type":"access"}'),
        ),
        ("duplicate header alg", signed_raw('{"alg":"none","alg":"HS256"}', good_json)),
        ("crit header", hs256(good, headers={"crit": ["exp"]})),
        ("JWE compact", "eyJhbGciOiJkaXIiLCJlbmMiOiJBMjU2R0NNIn0..aXY.Y2lwaGVy.dGFn"),
        ("two segments", ".".join(hs256(good).split(".")[:2])),
        ("four segments", hs256(good) + ".x"),
        ("garbage", "not-a-token"),
        ("over 8 KiB", hs256(claims_for("org_c1", pad="p" * 9000))),
        # hostile input round 2, 4: the header is parsed before the signature is checked
        (
            "2,000 nested arrays in the header",
            raw_token('{"alg":"HS256","x":' + "[" * 2000 + "]" * 2000 + "}", good, b"sig"),
        ),
        (
            "1,000 nested objects in the claims",
            signed_raw('{"alg":"HS256"}', '{"a":' * 1000 + "1" + "}" * 1000),
        ),
        # hostile input round 2, 11: time claims must be finite numbers in range
        (
            "exp 1 followed by 400 zeros",
            signed_raw(
                '{"alg":"HS256"}',
                good_json.replace(f'"exp": {good["exp"]}', '"exp": 1' + "0" * 400),
            ),
        ),
        (
            "exp NaN",
            signed_raw('{"alg":"HS256"}', good_json.replace(f'"exp": {good["exp"]}', '"exp": NaN')),
        ),
        (
            "exp 1e400",
            signed_raw(
                '{"alg":"HS256"}', good_json.replace(f'"exp": {good["exp"]}', '"exp": 1e400')
            ),
        ),
        (
            "exp Infinity",
            signed_raw(
                '{"alg":"HS256"}', good_json.replace(f'"exp": {good["exp"]}', '"exp": Infinity')
            ),
        ),
        (
            "nbf -Infinity",
            signed_raw(
                '{"alg":"HS256"}', good_json.replace(f'"nbf": {good["nbf"]}', '"nbf": -Infinity')
            ),
        ),
        ("negative exp", hs256(claims_for("org_c1", exp=-1))),
    ]


@pytest.mark.parametrize(("name", "token"), hostile_tokens(), ids=[n for n, _ in hostile_tokens()])
async def test_hostile_token_is_401_and_deletes_nothing(
    local_gateway: TestClient, local_harness: LocalHarness, name: str, token: str
) -> None:
    bid = new_backup_id()
    loc = location_for("org_c1", bid)
    local_harness.put(loc)
    resp = await local_gateway.delete(f"/api/systems/sys_c1/backups/{bid}", headers=bearer(token))
    assert resp.status == 401, name
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert await resp.json() == {"code": 401, "message": "invalid token", "data": {}}
    assert local_harness.exists(loc)


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer ",
        "Token abc",
        "bearer",
        "Bearer\tx.y.z",
        "Bearer ÿÿÿ",
    ],
)
async def test_malformed_authorization_header_is_401(
    local_gateway: TestClient, local_harness: LocalHarness, authorization: str
) -> None:
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    resp = await local_gateway.delete(
        f"/api/systems/sys_c1/backups/{bid}", headers={"Authorization": authorization}
    )
    assert resp.status == 401
    assert local_harness.exists(location_for("org_c1", bid))


async def test_kid_jku_x5u_jwk_headers_are_ignored_never_fetched(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    # A valid token whose header points elsewhere: verified with the configured key only.
    headers = {
        "kid": "../../etc/passwd",
        "jku": "http://127.0.0.1:1/jwks",
        "x5u": "http://127.0.0.1:1/cert",
        "jwk": {"kty": "oct", "k": b64(b"attacker")},
    }
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    resp = await local_gateway.delete(
        f"/api/systems/sys_c1/backups/{bid}",
        headers=bearer(hs256(claims_for("org_c1"), headers=headers)),
    )
    assert resp.status == 200
    # and the same header with an attacker-chosen key is refused
    bid2 = new_backup_id()
    local_harness.put(location_for("org_c1", bid2))
    forged = jwt.encode(claims_for("org_c1"), "attacker", algorithm="HS256", headers=headers)
    resp = await local_gateway.delete(f"/api/systems/sys_c1/backups/{bid2}", headers=bearer(forged))
    assert resp.status == 401
    assert local_harness.exists(location_for("org_c1", bid2))


async def test_leeway_accepts_slightly_expired(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    token = hs256(claims_for("org_c1", exp=int(time.time()) - 10))
    resp = await local_gateway.delete(f"/api/systems/sys_c1/backups/{bid}", headers=bearer(token))
    assert resp.status == 200
    assert not local_harness.exists(location_for("org_c1", bid))


@pytest.mark.parametrize("role", ["", "Janitor"])
async def test_a_role_the_platform_does_not_know_reaches_nothing(
    local_gateway: TestClient, local_harness: LocalHarness, role: str
) -> None:
    """A signed token whose org_role is empty or unknown is well formed: 403 at step 4,
    after the system's own 404, as the platform answers; never a 401."""
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    token = hs256(user_claims(org_role=role))
    resp = await local_gateway.delete(f"/api/systems/sys_c1/backups/{bid}", headers=bearer(token))
    assert (resp.status, await resp.json()) == (
        403,
        {"code": 403, "message": "access denied to system", "data": {}},
    )
    assert local_harness.exists(location_for("org_c1", bid))
    resp = await local_gateway.delete(f"/api/systems/sys_nope/backups/{bid}", headers=bearer(token))
    assert resp.status == 404 and (await resp.json())["message"] == "system not found"


# ---- issuer and audience


@pytest.mark.parametrize(
    ("overrides", "status"),
    [
        ({"iss": ISSUER, "aud": AUDIENCE}, 200),
        ({"iss": ISSUER, "aud": ["other", AUDIENCE]}, 200),
        ({"iss": ISSUER}, 401),  # aud required when configured
        ({"iss": ISSUER, "aud": "other"}, 401),
        ({"aud": AUDIENCE}, 401),  # iss required when configured
        ({"iss": "https://evil.example", "aud": AUDIENCE}, 401),
    ],
)
async def test_issuer_and_audience_checked_when_configured(
    start_gateway: Any, local_harness: LocalHarness, overrides: dict[str, Any], status: int
) -> None:
    client = await start_gateway(
        local_harness.storage(), auth={"issuer": ISSUER, "audience": AUDIENCE}
    )
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    token = hs256(claims_for("org_c1", **overrides))
    resp = await client.delete(f"/api/systems/sys_c1/backups/{bid}", headers=bearer(token))
    assert resp.status == status
    assert local_harness.exists(location_for("org_c1", bid)) == (status != 200)


async def test_audience_ignored_when_not_configured(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    token = hs256(claims_for("org_c1", aud="whatever", iss="anyone"))
    resp = await local_gateway.delete(f"/api/systems/sys_c1/backups/{bid}", headers=bearer(token))
    assert resp.status == 200


# ---- asymmetric keys


def _keypair(kind: str) -> tuple[bytes, bytes]:
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_public_key_algorithms(
    start_gateway: Any, local_harness: LocalHarness, tmp_path: Path, alg: str
) -> None:
    private, public = _keypair(alg)
    (tmp_path / "jwt.pem").write_bytes(public)
    client = await start_gateway(
        local_harness.storage(),
        auth={"algorithms": [alg], "secret": None, "public_key_file": "jwt.pem"},
    )
    good = jwt.encode(claims_for("org_c1"), private.decode(), algorithm=alg)
    # The classic confusion attack: HS256 with the public key as the HMAC secret.
    confused = signed_raw(
        '{"alg":"HS256","typ":"JWT"}', json.dumps(claims_for("org_c1")), public.decode()
    )
    # CVE-2026-85394: python-jose 3.5.0 accepts a DER-encoded public key as an HMAC secret.
    der = serialization.load_pem_public_key(public).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    confused_der = signed_raw_bytes(
        '{"alg":"HS256","typ":"JWT"}', json.dumps(claims_for("org_c1")), der
    )
    other_private, _ = _keypair(alg)
    foreign = jwt.encode(claims_for("org_c1"), other_private.decode(), algorithm=alg)
    for token, status in [(confused, 401), (confused_der, 401), (foreign, 401), (good, 200)]:
        bid = new_backup_id()
        local_harness.put(location_for("org_c1", bid))
        resp = await client.delete(f"/api/systems/sys_c1/backups/{bid}", headers=bearer(token))
        assert resp.status == status
        assert local_harness.exists(location_for("org_c1", bid)) == (status != 200)


def test_mixing_hmac_and_public_key_algorithms_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="auth.algorithms: mixes HMAC"):
        make_config(tmp_path, auth={"algorithms": ["HS256", "RS256"]})


def test_private_key_file_is_refused(tmp_path: Path) -> None:
    private, _ = _keypair("RS256")
    (tmp_path / "jwt.pem").write_bytes(private)
    config = make_config(
        tmp_path, auth={"algorithms": ["RS256"], "secret": None, "public_key_file": "jwt.pem"}
    )
    with pytest.raises(ConfigError, match="private key"):
        TokenVerifier(config.auth)


def test_cached_token_still_expires(tmp_path: Path) -> None:
    now = [time.time()]
    verifier = TokenVerifier(make_config(tmp_path).auth, clock=lambda: now[0])
    token = hs256(claims_for("org_c1", ttl=60))
    assert verifier.verify(token).organization_id == "org_c1"
    assert verifier.verify(token).organization_id == "org_c1"  # from the cache
    now[0] += 60 + 31
    with pytest.raises(Exception, match="expired"):
        verifier.verify(token)


@pytest.mark.parametrize("bad", ["\x01", "\x7f", "\t", "é", "\u202e", "\x00"])
def test_control_and_non_ascii_characters_are_refused(tmp_path: Path, bad: str) -> None:
    from gateway.identity.tokens import InvalidToken

    verifier = TokenVerifier(make_config(tmp_path).auth)
    good = hs256(claims_for("org_c1"))
    assert verifier.verify(good).organization_id == "org_c1"
    for token in (bad + good, good[:10] + bad + good[10:], good + bad):
        with pytest.raises(InvalidToken):
            verifier.verify(token)


async def test_control_character_in_header_is_401_or_parser_400(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    token = hs256(claims_for("org_c1"))
    request = (
        f"DELETE /api/systems/sys_c1/backups/{bid} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token[:20]}\x7f{token[20:]}\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    host, port = local_gateway.server.host, local_gateway.server.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] in (b"400", b"401")
    assert local_harness.exists(location_for("org_c1", bid))
