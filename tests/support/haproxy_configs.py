"""HAProxy configurations to convert: the bench's own, the Loadbalancer.org guide's VIPs, and hand-written ones.

Every one passes ``haproxy -c`` (tests/integration/test_convert_haproxy.py checks it with HAProxy 2.6), so the
converter is tested on what HAProxy accepts, not on what we imagine it accepts. Addresses are IP literals: ``haproxy
-c`` resolves server names.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from tests.support.bench import ROUTES, common
from tests.support.tls import make_ca

# A bench module, importable once tests.support.bench has put bench/ on sys.path.
fault_targets = importlib.import_module("fault_targets")

# /work/shared/reference/loadbalancer-org-rabbitmq-guide.txt, section 11 (Layer 7 SNAT mode): a virtual service
# "RabbitMQ HA" on 192.168.2.5 port 5672 in TCP mode, real servers 192.168.2.10 and up with the Real Server Port
# left blank (the VIP's port), no persistence (section 5.1), and section 15.1: the feedback agent on each real
# server, TCP port 3333, whose reply scales the requested weight of 100. Written by hand in HAProxy's terms from
# those settings; what the guide does not give (timeouts, check timing) is ours.
LBO_LAYER7 = """\
global
    maxconn 40000
    daemon

defaults
    mode tcp
    timeout connect 4000
    timeout client 43200000
    timeout server 43200000

listen RabbitMQ_HA
    bind 192.168.2.5:5672 transparent
    balance leastconn
    option redispatch
    option abortonclose
    default-server check port 5672 inter 4000 rise 2 fall 2 agent-check agent-port 3333 agent-inter 6000
    server Rabbit1 192.168.2.10 weight 100
    server Rabbit2 192.168.2.11 weight 100
    server Rabbit3 192.168.2.12 weight 100
"""

# The guide's steps repeated for a second VIP on the AMQPS port (5671, TLS passed through to the nodes), written as
# a frontend/backend pair, with a statistics page beside it (skipped by the converter).
LBO_TWO_VIPS = """\
global
    stats socket /var/run/haproxy.stat mode 600 level admin

defaults
    mode tcp
    timeout connect 4s
    timeout client 12h
    timeout server 12h
    retries 3

listen stats
    bind 127.0.0.1:7777
    mode http
    stats enable
    stats uri /stats

frontend RabbitMQ_TLS
    bind 192.168.2.6:5671
    maxconn 20000
    default_backend rabbit_tls

backend rabbit_tls
    balance roundrobin
    default-server check inter 2s fall 3 rise 2 on-marked-down shutdown-sessions
    server Rabbit1 192.168.2.10:5671
    server Rabbit2 192.168.2.11:5671
    server Rabbit3 192.168.2.12:5671 backup
"""

# Everything the converter reads, with a note of the line numbers the unit tests name.
HAND_FULL = """\
global
    nbthread 2
    hard-stop-after 2m
    log stdout format raw local0

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 1500ms
    timeout client 1h
    timeout server 1h
    timeout check 500000us
    retries 1
    default-server inter 3s fall 4 rise 1

listen amqp
    bind :5672
    bind :::5672 v4v6
    balance source
    maxconn 3000
    default-server check agent-check agent-port 3333 agent-inter 10s send-proxy
    server r1 10.1.0.1:5672 weight 1
    server r2 10.1.0.2:5672 weight 3 send-proxy-v2 maxconn 100
    server r3 10.1.0.3:5672 backup no-send-proxy
    server r4 [fd00::4]:5672 weight 0 inter 3s
    stick-table type ip size 1m expire 1h
    stick on src

listen web
    mode http
    bind :8080
    server w1 10.1.0.9:80

frontend amqps
    bind 10.1.0.100:5671 ssl crt PEM_FILE alpn amqp
    default_backend rmq

backend rmq
    balance first
    timeout connect 2s
    option httpchk GET /api/health/checks/local-alarms
    server n1 10.1.0.1:5672 check port 15672 inter 1d
    server n2 10.1.0.2:5672 check port 15672 inter 1d fastinter 1s

backend orphan
    server o1 10.1.0.5:5672
"""

# Weights beyond what 100x can hold, static-rr, no checks, a timeout in minutes.
HAND_WEIGHTS = """\
defaults
    mode tcp
    timeout connect 1m
    timeout client 30s
    timeout server 30s

listen big
    bind 127.0.0.1:5680
    balance static-rr
    server a 127.0.0.1:5001 weight 256
    server b 127.0.0.1:5002 weight 10
    server c 127.0.0.1:5003
"""


def hand_configs(tmp_path: Path) -> dict[str, str]:
    """The hand-written and Loadbalancer.org configurations; the TLS frontend's PEM (certificate and key, as
    HAProxy wants it) is made in ``tmp_path``, since both ``haproxy -c`` and ``check-config`` open it."""
    ca = make_ca(tmp_path, "haproxy-test")
    cert, key = ca.issue("amqps")
    pem = tmp_path / "amqps.pem"
    pem.write_text(cert.read_text() + key.read_text())
    return {
        "full": HAND_FULL.replace("PEM_FILE", str(pem)),
        "weights": HAND_WEIGHTS,
        "lbo-layer7": LBO_LAYER7,
        "lbo-two-vips": LBO_TWO_VIPS,
    }


def bench_configs(tmp_path: Path) -> dict[str, str]:
    """The HAProxy configurations bench/ writes: the TCP and AMQP benches' (plain and tuned) and the fault matrix's."""
    checks = fault_targets.Checks()
    return {
        "bench": common.haproxy_config(ROUTES, maxconn=1000),
        "bench-tuned": common.haproxy_config(ROUTES, tuned=True, maxconn=1000, nbthread=2),
        "faults": fault_targets.haproxy_config(15672, tmp_path / "haproxy.sock", [(5001, 7001), (5002, 7002)], checks),
    }
