"""TCP keepalive on both legs, so a peer that vanished (a host gone, a NAT entry expired) is found and closed.

An AMQP heartbeat finds a dead peer only if both ends negotiated one, and a connection whose close is waiting for
a flush sends no heartbeats at all; keepalive probes are the kernel's own check underneath.

Cost on the data path: nothing per client. On Linux an accepted socket inherits ``SO_KEEPALIVE`` and the
``TCP_KEEP*`` settings from its listening socket (``sk_clone_lock`` copies them and ``tcp_create_openreq_child``
starts the keepalive timer), so they are set once on the listener. The backend socket is made by
``create_connection``, which has no hook before connecting: setting it costs one socket object wrapped around its
descriptor and four ``setsockopt`` system calls, which was about 19 µs of the proxy's CPU per short connection
(155 against 136 µs, interleaved, one service relaying one-byte echo connections). So the backend leg is told
:data:`KEEPALIVE_AFTER` seconds after it attached, by one timer for all connections (``Service.keepalive_deadlines``):
a connection that ends before that never pays, and one that lives on gets its first probe at most that much later
than its ``idle`` (60 s by default), which changes nothing for the dead peers keepalive is there to find.
``tcp_keepalive = false`` turns it off for both legs.
"""

from __future__ import annotations

import socket
from typing import Any

from rabbitproxy.config import KeepaliveConfig

# Seconds after attach at which a backend leg gets its keepalive settings (see the module docstring).
KEEPALIVE_AFTER = 1.0


def set_keepalive(sock: Any, keepalive: KeepaliveConfig | None) -> None:
    """Switch keepalive on ``sock`` on with ``keepalive``'s timings, or off for ``None``.

    ``sock`` is a socket or the socket-like object a transport hands out; ``None`` (a fake transport, a transport
    already closed) is ignored. An ``OSError`` (the socket was reset meanwhile) is ignored too: the connection is
    ending anyway and the loop reports that by itself.
    """
    if sock is None:
        return
    # uvloop's socket stand-in builds and detaches a socket object for every setsockopt; one wrapper around the
    # descriptor for the whole batch costs a quarter of that. It is detached, never closed: the transport owns it.
    own = sock if isinstance(sock, socket.socket) else None
    try:
        fd = sock.fileno()
        if fd < 0:
            return  # closed already; a wrapper around -1 would be a new socket
        s = own or socket.socket(sock.family, sock.type, sock.proto, fd)
        try:
            if keepalive is None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
                return
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive.idle)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive.interval)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive.count)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        finally:
            if own is None:
                s.detach()
    except OSError:
        pass
