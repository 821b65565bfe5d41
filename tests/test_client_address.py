"""The failed-login brake and the client's address, against a real gateway process.

Issue #26 (High 1): the brake counted by the address and the key *named* and was asked
before the credentials, so anyone could lock a known system out of uploading. Behind a
load balancer the client's address comes from X-Forwarded-For, and only from the proxies
in `server.trusted_proxies`. The gateway listens on 127.0.0.1; connections from 127.0.0.1
play the trusted load balancer, connections bound to 127.0.0.2 a client that is not one.
"""

from __future__ import annotations

import base64
import http.client
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import S3Server
from .support import (
    APPLIANCE_SECRETS,
    LocalHarness,
    OutputWatcher,
    S3Harness,
    free_port,
    serve_gateway,
    wait_for_port,
    write_config,
)

KEY = "KEY-C1"
GOOD = APPLIANCE_SECRETS["sys_c1"]
TRUSTED_PEER, UNTRUSTED_PEER = "127.0.0.1", "127.0.0.2"


class Gateway:
    def __init__(self, tmp_path: Path, storage: dict[str, Any], **server: Any) -> None:
        self.port = free_port()
        config = write_config(
            tmp_path,
            self.port,
            {**storage, "retention": {"failed_logins_per_minute": 3, "uploads_per_minute": 0}},
            server=server,
        )
        self.proc = serve_gateway(config)
        self.output = OutputWatcher(self.proc)
        wait_for_port(self.port, proc=self.proc)

    def upload(
        self, secret: str, source: str = TRUSTED_PEER, **headers: str
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        auth = base64.b64encode(f"{KEY}:{secret}".encode()).decode()
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=10, source_address=(source, 0)
        )
        try:
            connection.request(
                "POST",
                "/api/systems/backups",
                body=b"backup bytes",
                headers={"Authorization": f"Basic {auth}", "X-Filename": "b.tar.gz", **headers},
            )
            answer = connection.getresponse()
            return answer.status, json.loads(answer.read()), dict(answer.getheaders())
        finally:
            connection.close()

    def records(self, logger: str, msg: str, count: int) -> list[dict[str, Any]]:
        """The first `count` records of `logger` saying `msg`, once that many were written."""

        def found(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
            mine = [r for r in records if r.get("logger") == logger and r["msg"] == msg]
            return mine[:count] if len(mine) >= count else []

        return list(self.output.wait_for(found))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.output.wait_closed()


@pytest.fixture
def local_storage(tmp_path: Path) -> dict[str, Any]:
    return LocalHarness(tmp_path / "backups").storage()


@pytest.fixture
def gateway(tmp_path: Path, local_storage: dict[str, Any]) -> Iterator[Gateway]:
    running = Gateway(tmp_path, local_storage, trusted_proxies=[TRUSTED_PEER])
    yield running
    running.stop()


def _stored(root: Path) -> list[str]:
    folder = root / "org_c1" / KEY
    return sorted(p.name for p in folder.glob("*.tar.gz")) if folder.exists() else []


def test_wrong_secrets_never_lock_out_the_right_one(gateway: Gateway, tmp_path: Path) -> None:
    """The attack: wrong secrets for a known key from the address every appliance shares."""
    for _ in range(3):
        assert gateway.upload("my_wrong.guess")[0] == 401
    status, body, headers = gateway.upload("my_wrong.guess")
    assert (status, body["message"]) == (429, "too many failed authentication attempts")
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert _stored(tmp_path / "backups") == []
    # the appliance itself, from the same address, in the same minute: stored
    status, body, _ = gateway.upload(GOOD)
    assert status == 201, body
    assert _stored(tmp_path / "backups") == [body["data"]["id"]]
    # and the guesser is still braked
    assert gateway.upload("my_wrong.guess")[0] == 429


def test_the_brake_counts_the_forwarded_client(gateway: Gateway) -> None:
    """Behind the trusted load balancer each client has its own count."""
    for _ in range(3):
        assert gateway.upload("my_wrong.guess", **{"X-Forwarded-For": "203.0.113.9"})[0] == 401
    assert gateway.upload("my_wrong.guess", **{"X-Forwarded-For": "203.0.113.9"})[0] == 429
    # another client behind the same balancer is not held up by those failures
    assert gateway.upload("my_wrong.guess", **{"X-Forwarded-For": "203.0.113.10"})[0] == 401
    audits = gateway.records("gateway.audit", "backup upload", 5)
    assert [r["peer"] for r in audits] == ["203.0.113.9"] * 4 + ["203.0.113.10"]


def test_a_forwarded_address_is_taken_only_from_a_trusted_proxy(gateway: Gateway) -> None:
    forged = {"X-Forwarded-For": "198.51.100.1"}
    assert gateway.upload(GOOD, source=TRUSTED_PEER, **forged)[0] == 201
    assert gateway.upload(GOOD, source=UNTRUSTED_PEER, **forged)[0] == 201
    # a client that names itself before the balancer's entry is not believed either
    chained = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}
    assert gateway.upload(GOOD, source=TRUSTED_PEER, **chained)[0] == 201
    access = gateway.records("gateway.access", "request", 3)
    audits = gateway.records("gateway.audit", "backup upload", 3)
    expected = ["198.51.100.1", UNTRUSTED_PEER, "203.0.113.7"]
    assert [r["client"] for r in access] == expected
    assert [r["peer"] for r in audits] == expected


def test_an_untrusted_peer_cannot_spread_its_failures(gateway: Gateway) -> None:
    """A direct client rotating X-Forwarded-For still counts as itself."""
    for n in range(3):
        assert (
            gateway.upload("my_x.y", UNTRUSTED_PEER, **{"X-Forwarded-For": f"192.0.2.{n}"})[0]
            == 401
        )
    status, body, _ = gateway.upload("my_x.y", UNTRUSTED_PEER, **{"X-Forwarded-For": "192.0.2.9"})
    assert status == 429, body


def test_a_malformed_forwarded_header_is_a_clear_400(gateway: Gateway, tmp_path: Path) -> None:
    status, body, headers = gateway.upload(GOOD, **{"X-Forwarded-For": "not-an-address"})
    assert status == 400
    assert body == {"code": 400, "message": "invalid X-Forwarded-For", "data": {}}
    assert headers["X-Request-ID"]
    assert _stored(tmp_path / "backups") == []


def test_uploader_ip_is_the_forwarded_client_on_s3(tmp_path: Path, s3_server: S3Server) -> None:
    harness = S3Harness(s3_server.endpoint, f"fwd-{free_port()}")
    running = Gateway(tmp_path, harness.storage(), trusted_proxies=["127.0.0.0/31"])
    try:
        status, body, _ = running.upload(GOOD, **{"X-Forwarded-For": "203.0.113.5"})
        assert status == 201, body
        key = f"org_c1/{KEY}/{body['data']['id']}"
        head = harness.client.head_object(Bucket=harness.bucket, Key=key)
        assert head["Metadata"]["uploader-ip"] == "203.0.113.5"
    finally:
        running.stop()


def test_a_bad_trusted_proxy_is_a_config_error(
    tmp_path: Path, local_storage: dict[str, Any]
) -> None:
    from gateway.config_loader import ConfigError

    from .support import make_config

    with pytest.raises(ConfigError, match="server.trusted_proxies"):
        make_config(tmp_path, local_storage, server={"trusted_proxies": ["10.0.0.300"]})
