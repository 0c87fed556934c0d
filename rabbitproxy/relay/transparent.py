"""Transparent mode (``source_address = "client"``): backend connections come from the client's own address.

The brokers then see each client's real address as the connection's peer, without the PROXY protocol. The socket
that connects to the backend is given ``IP_TRANSPARENT`` (``IPV6_TRANSPARENT`` for IPv6), which lets it bind an
address this host does not own, and is bound to ``(client ip, 0)`` before it connects. That needs:

- the CAP_NET_ADMIN capability (or CAP_NET_RAW) to set the option: :func:`check_transparent` tries it once on a
  throwaway socket when a service is started or reloaded, and refuses with a config error naming the key otherwise;
- the brokers' packets for client addresses routed back through the proxy host (their default route, or a route
  for the clients' networks), and policy routing on the proxy host that delivers them locally instead of
  forwarding them: a socket match in netfilter marks them, ``ip rule add fwmark 1 lookup 100`` and
  ``ip route add local 0.0.0.0/0 dev lo table 100`` deliver them. docs/deployment.md shows the whole setup.

Without that routing the SYN goes out but its answer never reaches the socket: every connect then ends in
``connect_timeout``, which is what an operator will see. The non-transparent path does not go through this module.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Iterable

from rabbitproxy.config import SOURCE_CLIENT, ConfigError, ServiceConfig

# Linux's values (include/uapi/linux/in.h and in6.h); Python 3.11's socket module names neither of them.
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)


def transparent_socket(client_ip: str) -> socket.socket:
    """A non-blocking TCP socket bound to ``(client_ip, 0)`` with IP_TRANSPARENT, ready to connect."""
    v6 = ":" in client_ip
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((client_ip, 0))
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_as_client(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    client_ip: str,
    ssl_ctx: ssl.SSLContext | None,
    server_hostname: str | None,
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """``create_connection`` to ``host:port`` from ``client_ip``: what the connect task runs in transparent mode.

    The loop's ``create_connection`` has no way to set a socket option before its bind, so the socket is made here
    and connected with ``sock_connect`` (which resolves ``host`` in the client address's family), then handed over.
    """
    sock = transparent_socket(client_ip)
    try:
        await loop.sock_connect(sock, (host, port))
        return await loop.create_connection(factory, sock=sock, ssl=ssl_ctx, server_hostname=server_hostname)
    except BaseException:
        # A deadline, a redirect or a failed connect: the socket is ours until a transport owns it. Closing it
        # after a transport took it is harmless (asyncio's close is idempotent, uvloop detached the descriptor).
        sock.close()
        raise


def check_transparent(configs: Iterable[ServiceConfig]) -> None:
    """Raise :class:`ConfigError` naming ``source_address`` if a transparent service could not set IP_TRANSPARENT.

    Tried on a throwaway socket, so a missing capability is found at start or reload, not at the first client.
    """
    names = [sc.name for sc in configs if sc.source_address == SOURCE_CLIENT]
    if not names:
        return
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    except OSError as exc:
        raise ConfigError(
            [
                f'services[{name!r}].source_address: "client" (transparent mode) needs the CAP_NET_ADMIN'
                f" capability to set IP_TRANSPARENT, which this process does not have ({exc.strerror or exc})"
                for name in names
            ]
        ) from None
