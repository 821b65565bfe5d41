"""A port someone already listens on, found before start-up writes anything.

`make run` seeds the demo and then serves: a second `make run` beside a running gateway
once re-seeded that gateway's data and then died on the bind with a traceback. The
address is tried here first (bound and released at once, as the server will bind it),
so a busy one is a single line naming it and how to pick another, exit 2.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from .config import ServerConfig
from .http.listening import listening_socket


class PortBusy(Exception):
    """The configured address is taken; the message is the whole line for the user."""


def refuse_busy_port(server: ServerConfig, config_path: Path) -> None:
    """Raise PortBusy when something listens on the server's address already."""
    try:
        infos = socket.getaddrinfo(
            server.host or None,
            server.port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
    except socket.gaierror:
        return  # an unresolvable host is the server's own error to report, as before
    for family, kind, proto, _, address in infos:
        with listening_socket(family, kind, proto) as probe:  # as the server will bind
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    return  # not ours to judge (no such address here): the bind says why
                raise PortBusy(_message(address, server.port, config_path)) from None


def _message(address: tuple[object, ...], port: int, config_path: Path) -> str:
    host = str(address[0])
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        # the embedded default reads its port from GATEWAY_PORT: say so where it does
        by_environment = "GATEWAY_PORT" in config_path.read_text(encoding="utf-8")
    except OSError:
        by_environment = False
    how = (
        f"set GATEWAY_PORT to another port (GATEWAY_PORT={port + 1} make run)"
        if by_environment
        else f"set server.port in {config_path} to another port"
    )
    return f"{shown} is in use (is a gateway running already?); {how}"
