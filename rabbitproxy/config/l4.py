"""What ``mode = "l4-nat"`` cannot do: the keys a kernel-forwarded service refuses, each named in the message.

In layer-4 NAT mode the kernel rewrites and forwards each packet (rabbitproxy only programs nftables), so nothing
in this process sees a byte of the stream: whatever needs to read, write, time or hold a connection cannot apply.
Only keys the file sets are judged, so a default (``protocol = "amqp"``, say) never turns into a refusal.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rabbitproxy.config.service import Config, ServiceConfig

L4_NAT = "l4-nat"

# key -> why it cannot apply; judged only when the file sets the key (model_fields_set).
_DATA_PATH_KEYS = {
    "tls": "nothing terminates TLS: the kernel forwards the encrypted bytes as they are",
    "backend_tls": "nothing originates TLS: the client's own connection reaches the backend",
    "backend_tls_ca": "nothing originates TLS",
    "backend_tls_server_name": "nothing originates TLS",
    "send_proxy_protocol": "no header can be inserted; the backend sees the client's own address anyway",
    "accept_proxy_protocol": "no header can be read: the kernel forwards the bytes unread",
    "proxy_protocol_from": "no PROXY header is read in this mode",
    "source_address": "the backend sees the client's own address already (DNAT keeps the source)",
    "client_idle_timeout": "the kernel's conntrack timeouts govern idle flows, not this process",
    "client_hello_timeout": "the AMQP handshake is not read in this mode",
    "max_connections": "the kernel keeps no per-service connection limit here",
    "close_timeout": "this process closes no connection in this mode",
    "connect_timeout": "the client's own SYN reaches the backend; the client's timeout applies",
    "retries": "a refused connect reaches the client, which retries itself",
    "tcp_keepalive": "set keepalive on the clients and brokers: this process holds no socket of the flow",
    "high_water": "no buffer in this process",
    "low_water": "no buffer in this process",
    "backlog": "no listener in this process",
    "freebind": "no listener in this process",
    "connect_rate": "the kernel forwards each SYN at once; nothing here can hold a client",
    "connect_burst": "the kernel forwards each SYN at once; nothing here can hold a client",
    "connect_queue_timeout": "the kernel forwards each SYN at once; nothing here can hold a client",
}


def l4_errors(cfg: Config) -> list[str]:
    """``services[NAME]: key cannot apply ...`` for every l4-nat service of a file whose models are valid."""
    return [f"services[{sc.name!r}]: {line}" for sc in cfg.services if sc.mode == L4_NAT for line in l4_refusals(sc)]


def l4_refusals(sc: ServiceConfig) -> list[str]:
    """Why ``sc`` (with ``mode = "l4-nat"``) cannot run, one ``key: reason`` per problem; empty when it can."""
    out: list[str] = []
    tail = f'cannot apply with mode = "{L4_NAT}"'
    for key, why in _DATA_PATH_KEYS.items():
        if key in sc.model_fields_set:
            out.append(f"{key} {tail}: {why}")
    if "protocol" in sc.model_fields_set and sc.protocol == "amqp":
        out.append(f'protocol = "amqp" {tail}: the AMQP handshake is not read; write protocol = "tcp" or leave it out')
    if sc.balance == "least-connections":
        out.append(
            f'balance = "least-connections" {tail}: no connection is counted here; '
            "use weighted-round-robin or source-hash"
        )
    if sc.rebalance.enabled:
        out.append(f"rebalance.enabled {tail}: the rebalancer closes connections it knows, and none is known here")
    host = sc.listen_host
    if not _ipv4(host):
        out.append(f"listen {tail}: the address must be an IPv4 address (or 0.0.0.0), not {host!r}")
    for b in sc.backends:
        if not _ipv4(b.address) or b.address == "0.0.0.0":
            out.append(
                f"backends[{b.name!r}].address {tail}: must be an IPv4 address (DNAT needs one), not {b.address!r}"
            )
        if b.max_connections:
            out.append(f"backends[{b.name!r}].max_connections {tail}: the kernel keeps no per-backend limit here")
        if b.send_proxy_protocol is not None:
            out.append(f"backends[{b.name!r}].send_proxy_protocol {tail}: no header can be inserted")
        if b.connect_rate:
            out.append(f"backends[{b.name!r}].connect_rate {tail}: the kernel forwards each SYN at once")
    return out


def _ipv4(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False
