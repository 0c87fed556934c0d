"""Listening sockets: binding them (all or none), and running out of descriptors without drowning the log.

:func:`bind_all` binds every listener of a start or reload before any serves, so one port conflict fails the
whole change and nothing is half-applied.

When the process hits its descriptor limit (EMFILE) or the system's (ENFILE), ``accept()`` fails. Both loops
recover on their own: asyncio stops watching the listener and tries again a second later; uvloop (libuv) accepts
and drops the waiting connects with a spare descriptor and keeps listening. What asyncio also does is report every
failed ``accept()`` through the loop's exception handler with a full traceback, hundreds a second, which turns a
resource problem into a disk-filling one. :func:`quiet_accept_errors` turns those reports into one warning per
interval with a count, and passes every other report on untouched.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from typing import Any

import structlog

from rabbitproxy.config import ConfigError, ServiceConfig

log = structlog.get_logger("rabbitproxy.listeners")

_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# One warning per this many seconds while accept keeps failing.
REPORT_INTERVAL = 5.0


class AcceptErrorFilter:
    """A loop exception handler that condenses out-of-resource accept failures into periodic warnings."""

    __slots__ = ("_last", "_previous", "suppressed", "total")

    def __init__(self, previous: Any = None) -> None:
        self._previous = previous
        self._last = -REPORT_INTERVAL
        self.suppressed = 0
        self.total = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS and "accept" in str(context.get("message")):
            self.total += 1
            now = time.monotonic()
            if now - self._last >= REPORT_INTERVAL:
                log.warning(
                    "cannot accept connections: out of descriptors; retrying",
                    error=exc.strerror,
                    failures_since_last_report=self.suppressed + 1,
                )
                self._last = now
                self.suppressed = 0
            else:
                self.suppressed += 1
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> AcceptErrorFilter:
    """Install the filter on ``loop`` (once; a second call returns the installed one)."""
    current = loop.get_exception_handler()
    if isinstance(current, AcceptErrorFilter):
        return current
    handler = AcceptErrorFilter(current)
    loop.set_exception_handler(handler)
    return handler


# From <linux/in.h>; Python's socket module does not export it. The kernel honours it on IPv6 sockets too.
IP_FREEBIND = 15


def bind_listener(
    config: ServiceConfig, *, reuse_port: bool = False, listen: bool = True, port: int | None = None
) -> socket.socket:
    """Create the service's listening socket (SO_REUSEADDR; IPv6 sockets only IPv6, like nginx's ipv6only).

    With ``freebind`` the address need not be local yet, as with ``net.ipv4.ip_nonlocal_bind = 1`` but for this
    socket only: a keepalived standby listens on the VIP before it owns it.

    ``reuse_port`` (worker processes) sets SO_REUSEPORT, so every worker binds the same port and the kernel spreads
    the connects over them. ``listen=False`` only binds: the supervising process of the workers holds each port
    that way (a port another program holds still fails the start) without taking a share of the connects, which
    the kernel hands only to listening sockets.
    """
    host = config.listen_host
    if port is None:
        port = config.listen_port
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if config.freebind:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        if listen:
            sock.listen(config.backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_all(
    configs: list[ServiceConfig], *, reuse_port: bool = False, listen: bool = True
) -> dict[str, socket.socket]:
    """Bind the listeners of ``configs``; on any failure close those already bound and raise ConfigError."""
    socks: dict[str, socket.socket] = {}
    for sc in configs:
        try:
            socks[sc.name] = bind_listener(sc, reuse_port=reuse_port, listen=listen)
        except OSError as exc:
            for s in socks.values():
                s.close()
            raise ConfigError([f"services[{sc.name!r}].listen: cannot listen on {sc.listen}: {exc.strerror}"]) from None
    return socks


def bind_node_listeners(config: ServiceConfig, *, reuse_port: bool = False) -> dict[str, socket.socket]:
    """Bind a stream service's ``node_port`` listeners (by backend name); all or none, else ConfigError."""
    socks: dict[str, socket.socket] = {}
    for backend, _host, port in config.node_listens:
        try:
            socks[backend] = bind_listener(config, reuse_port=reuse_port, port=port)
        except OSError as exc:
            for s in socks.values():
                s.close()
            raise ConfigError(
                [f"services[{config.name!r}].backends[{backend!r}].node_port: cannot listen on {port}: {exc.strerror}"]
            ) from None
    return socks
