"""The client's address: the peer's, or, behind a trusted proxy, the one it forwarded.

`X-Forwarded-For` is anyone's to write, so it is read only when the connection comes from
an address in `server.trusted_proxies`; then aiohttp-remotes parses it and walks it from
the right past the trusted hops, and the first address that is not a trusted proxy is the
client's. That address is `request.remote` for everything after this middleware: the
failed-login brake, the audit, the access log and an upload's `uploader-ip`.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp_remotes import XForwardedFiltered

from .envelope import envelope
from .middlewares import request_context

Network = IPv4Network | IPv6Network


def trusted_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or networks (`10.0.0.7`, `10.0.0.0/8`, `::1`); ValueError names a bad one."""
    return tuple(ip_network(entry.strip(), strict=False) for entry in entries)


def forwarded_client(trusted: tuple[Network, ...]) -> Middleware:
    """The outermost middleware: the request the rest of the app sees carries the client's
    address as `remote`. Without trusted proxies, it passes every request through as it is."""
    forwarded = XForwardedFiltered(trusted)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not trusted or not _from_trusted_peer(request, trusted):
            return await handler(request)
        try:
            return await forwarded.middleware(request, handler)
        except web.HTTPBadRequest:
            # Raised by the library for a malformed or repeated header: every inner failure
            # is an envelope already (error_envelope), so nothing else arrives here. Answered
            # through request_context, for its request id, access-log line and metrics.
            return await request_context(request, _invalid_forwarded_for)

    return middleware


async def _invalid_forwarded_for(request: web.Request) -> web.StreamResponse:
    return envelope(400, "invalid X-Forwarded-For")


def _from_trusted_peer(request: web.Request, trusted: tuple[Network, ...]) -> bool:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not peer:
        return False
    try:
        address = ip_address(peer[0])
    except ValueError:  # a Unix socket's peer: no address to trust
        return False
    return any(address in network for network in trusted)
