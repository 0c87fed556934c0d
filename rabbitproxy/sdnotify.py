"""systemd's readiness protocol (sd_notify), so ``Type=notify`` units and supervisors know when we serve.

When ``NOTIFY_SOCKET`` names a datagram socket, ``READY=1`` is sent once every listener is bound and the admin API
is up, and ``STOPPING=1`` when shutdown begins. Without the variable nothing happens. The test harness uses the same
signal instead of probing the port, which would itself open a proxied connection.
"""

from __future__ import annotations

import os
import socket


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the notify socket; False when there is none or it is gone."""
    env = os.environ if environ is None else environ
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return False
    # A leading "@" names a socket in Linux's abstract namespace.
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        # The supervisor went away or never listened; readiness is advisory, never a reason to fail.
        return False
    return True
