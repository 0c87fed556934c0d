"""A table of configuration files, good and broken, as an operator might write them (issue 26 tried about 40).

Each broken file lists every error it has, as ``(key path, fragment of the message)``; each good file the warnings
it draws. The unit tests check ``config.load`` against the table, the integration tests check that
``rabbitproxy check-config`` and ``rabbitproxy serve`` agree on every file of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# One service on loopback with two backends: every case is this file with something changed.
BASE = """\
[[services]]
name = "amqp"
listen = "127.0.0.1:5672"
health_check = { type = "none" }

  [[services.backends]]
  name = "r1"
  address = "127.0.0.1"
  port = 5673

  [[services.backends]]
  name = "r2"
  address = "127.0.0.1"
  port = 5674
"""

SVC = "services['amqp']"
R1 = f"{SVC}.backends['r1']"


def edit(old: str, new: str, text: str = BASE) -> str:
    """``text`` with ``old`` replaced once; a typo in a case fails loudly instead of testing the base file."""
    assert old in text, old
    return text.replace(old, new, 1)


def in_service(lines: str) -> str:
    """Keys added to the service table (before its backends)."""
    return edit('health_check = { type = "none" }\n', f'health_check = {{ type = "none" }}\n{lines}\n')


def in_r1(lines: str) -> str:
    return edit("  port = 5673\n", f"  port = 5673\n  {lines}\n")


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    # (key path, fragment): every error of a broken file, or every warning of a good one, in the order reported.
    # An empty key path stands for a message about the file itself (TOML syntax).
    expected: list[tuple[str, str]] = field(default_factory=list)


BROKEN = [
    Case(
        "octal-ipv4",
        edit('address = "127.0.0.1"', 'address = "010.0.0.10"'),
        [(f"{R1}.address", "a leading 0 makes the resolver read octal")],
    ),
    Case(
        "ipv4-out-of-range",
        edit('address = "127.0.0.1"', 'address = "10.0.0.300"'),
        [(f"{R1}.address", "'10.0.0.300' is not a valid IPv4 address")],
    ),
    Case(
        "ipv4-all-nines",
        edit('address = "127.0.0.1"', 'address = "999.999.999.999"'),
        [(f"{R1}.address", "is not a valid IPv4 address: write four decimal numbers from 0 to 255")],
    ),
    Case(
        "all-digit-host",
        edit('address = "127.0.0.1"', 'address = "12345"'),
        [(f"{R1}.address", "'12345' is all digits, which is not a host name")],
    ),
    Case("hex-ipv4", edit('address = "127.0.0.1"', 'address = "0x7f.1"'), [(f"{R1}.address", "not a valid IPv4")]),
    Case(
        "host-with-port",
        edit('address = "127.0.0.1"', 'address = "10.0.0.1:5672"'),
        [(f"{R1}.address", "a port goes in its own key")],
    ),
    Case(
        "ipv6-listen-unbracketed",
        edit('listen = "127.0.0.1:5672"', 'listen = ":::5674"'),
        [(f"{SVC}.listen", 'put IPv6 addresses in brackets, e.g. "[::]:5674"')],
    ),
    Case(
        "ipv6-listen-bare",
        edit('listen = "127.0.0.1:5672"', 'listen = "::1"'),
        [(f"{SVC}.listen", "put IPv6 addresses in brackets")],
    ),
    Case(
        "ipv6-admin-unbracketed",
        '[admin]\nlisten = "::1:9080"\n' + BASE,
        [("admin.listen", "put IPv6 addresses in brackets")],
    ),
    Case(
        "port-as-string",
        edit("port = 5673", 'port = "5673"'),
        [(f"{R1}.port", "port must be a number from 1 to 65535, not '5673'")],
    ),
    Case(
        "port-zero", edit("port = 5673", "port = 0"), [(f"{R1}.port", "port must be a number from 1 to 65535, not 0")]
    ),
    Case(
        "port-too-big", edit("port = 5673", "port = 70000"), [(f"{R1}.port", "port must be a number from 1 to 65535")]
    ),
    Case(
        "listen-port-too-big",
        edit('listen = "127.0.0.1:5672"', 'listen = "127.0.0.1:99999"'),
        [(f"{SVC}.listen", "port must be a number from 1 to 65535")],
    ),
    Case("check-port-as-float", in_r1("check_port = 5672.0"), [(f"{R1}.check_port", "port must be a number from 1")]),
    Case("backup-on", in_r1('backup = "on"'), [(f"{R1}.backup", "must be true or false, not the string 'on'")]),
    Case("weight-as-string", in_r1('weight = "100"'), [(f"{R1}.weight", "must be a whole number")]),
    Case(
        "workers-zero", "workers = 0\n" + BASE, [("workers", 'must be "auto" or a number of processes from 1 to 256')]
    ),
    Case("workers-word", 'workers = "many"\n' + BASE, [("workers", 'must be "auto" or a number')]),
    Case(
        "log-level",
        '[log]\nlevel = "verbose"\n' + BASE,
        [("log.level", "must be one of 'debug', 'info', 'warning' or 'error', not 'verbose'")],
    ),
    Case("unknown-key", in_service("colour = 3"), [(f"{SVC}.colour", "unknown key")]),
    Case(
        "duration-in-words",
        in_service('connect_timeout = "5 seconds"'),
        [(f"{SVC}.connect_timeout", "is not a duration: write seconds as a number (30, 0.5) or a string with a unit")],
    ),
    Case(
        "duration-days",
        in_service('shutdown_timeout = "1d"'),
        [(f"{SVC}.shutdown_timeout", '"250ms", "5s", "2m", "1h"')],
    ),
    Case("duration-negative", in_service("connect_timeout = -1"), [(f"{SVC}.connect_timeout", "must not be negative")]),
    Case(
        "duration-zero-interval",
        edit('health_check = { type = "none" }', 'health_check = { type = "tcp", interval = "0s" }'),
        [(f"{SVC}.health_check.interval", "must be more than 0 seconds")],
    ),
    Case(
        "keepalive-fraction",
        in_service('tcp_keepalive = { idle = "250ms" }'),
        [(f"{SVC}.tcp_keepalive.idle", "must be whole seconds")],
    ),
    Case(
        "idle-timeout-word",
        in_service('client_idle_timeout = "soon"'),
        [(f"{SVC}.client_idle_timeout", 'must be "auto" or a duration')],
    ),
    # The four cross-checks of issue 24's review: each case fails if its check is deleted.
    Case(
        "low-above-high",
        in_service("high_water = 2048\nlow_water = 4096"),
        [(f"{SVC}.low_water", "4096 must not exceed high_water (2048)")],
    ),
    Case(
        "rebalance-without-rabbitmq",
        in_service("rebalance = { enabled = true }"),
        [(f"{SVC}.rebalance", "needs [services.rabbitmq]")],
    ),
    Case(
        "health-url-scheme",
        edit('health_check = { type = "none" }', 'health_check = { type = "http", url = "ftp://{address}/" }'),
        [(f"{SVC}.health_check.url", "must start with http:// or https://")],
    ),
    Case(
        "backend-ca-without-backend-tls",
        in_service('backend_tls_ca = "/etc/ssl/certs/ca-certificates.crt"'),
        [(f"{SVC}.backend_tls_ca", "needs backend_tls = true")],
    ),
    Case(
        "server-name-without-backend-tls",
        in_service('backend_tls_server_name = "rabbit.example.com"'),
        [(f"{SVC}.backend_tls_server_name", "needs backend_tls = true")],
    ),
    Case(
        "proxy-header-under-tls",
        in_service("backend_tls = true").replace("  port = 5673\n", '  port = 5673\n  send_proxy_protocol = "v2"\n'),
        [(f"{R1}.send_proxy_protocol", "cannot be combined with backend_tls")],
    ),
    Case("duplicate-backend", edit('name = "r2"', 'name = "r1"'), [(f"{SVC}.backends[1].name", "'r1' is used twice")]),
    Case(
        "duplicate-service",
        BASE + BASE,
        [
            ("services[1].name", "service name 'amqp' is used twice"),
            ("services[1].listen", "services 'amqp' and 'amqp' both listen on 127.0.0.1:5672"),
        ],
    ),
    Case(
        "admin-open-without-token",
        '[admin]\nlisten = "0.0.0.0:9080"\n' + BASE,
        [("admin.token", "required because admin.listen (0.0.0.0:9080) is not a loopback address")],
    ),
    Case(
        "proxy-protocol-unfiltered",
        in_service("accept_proxy_protocol = true"),
        [(f"{SVC}.proxy_protocol_from", "required with accept_proxy_protocol = true")],
    ),
    Case(
        "management-ca-over-http",
        in_service('rabbitmq = { ca = "/etc/hostname" }'),
        [(f"{SVC}.rabbitmq.ca", 'needs scheme = "https"')],
    ),
    Case(
        "source-address-octal",
        in_service('source_address = "010.0.0.1"'),
        [(f"{SVC}.source_address", "'010.0.0.1' is not an IP address")],
    ),
    Case("no-backends", BASE.split("  [[services.backends]]")[0], [(f"{SVC}.backends", "required, but missing")]),
    Case("empty-name", edit('name = "r2"', 'name = ""'), [(f"{SVC}.backends[1].name", "must not be empty")]),
    Case(
        "long-name",
        edit('name = "r2"', f'name = "{"x" * 129}"'),
        [(f"{SVC}.backends[1].name", "at most 128 characters")],
    ),
    Case("infinite-rate", in_service("rabbitmq = { close_rate = inf }"), [(f"{SVC}.rabbitmq.close_rate", "finite")]),
    Case("no-services", '[log]\nlevel = "info"\n', [("services", "required, but missing")]),
    Case("toml-syntax", "[[services]\n", [("", "TOML syntax")]),
    # Errors of several tables and kinds in one file: all of them come in one run, not in rounds.
    Case(
        "many-errors",
        'workers = 0\n[admin]\nlisten = "0.0.0.0:9080"\n'
        + in_service('high_water = 2048\ncolour = "red"')
        .replace("port = 5673", 'port = "5673"')
        .replace('address = "127.0.0.1"\n  port = 5674', 'address = "010.0.0.10"\n  port = 5674'),
        [
            ("workers", "must be"),
            (f"{SVC}.colour", "unknown key"),
            (f"{SVC}.low_water", "must not exceed high_water (2048)"),
            (f"{R1}.port", "port must be a number from 1 to 65535"),
            (f"{SVC}.backends['r2'].address", "leading 0"),
            ("admin.token", "required"),
        ],
    ),
]

GOOD = [
    Case("base", BASE),
    Case(
        "durations",
        in_service(
            'connect_timeout = "250ms"\nshutdown_timeout = "2m"\nclose_timeout = 5\nclient_hello_timeout = "1.5s"\n'
            'client_idle_timeout = "1h"\nslow_start = "30s"\ntcp_keepalive = { idle = "1m", interval = "10s" }'
        ),
    ),
    Case(
        "ipv6",
        edit('listen = "127.0.0.1:5672"', 'listen = "[::1]:5672"').replace(
            'address = "127.0.0.1"\n  port = 5674', 'address = "[::1]"\n  port = 5674'
        ),
    ),
    Case("admin-open-with-token", '[admin]\nlisten = "0.0.0.0:9080"\ntoken = "s3cret"\n' + BASE),
    Case(
        "check-timeout-over-interval",
        edit('health_check = { type = "none" }', 'health_check = { type = "tcp", interval = "1s", timeout = "3s" }'),
        [(f"{SVC}.health_check.timeout", "3 s is longer than interval (1 s)")],
    ),
    Case(
        "feedback-timeout-over-interval",
        in_service('feedback = { type = "agent", interval = 1, timeout = 2 }'),
        [(f"{SVC}.feedback.timeout", "2 s is longer than interval (1 s)")],
    ),
    Case(
        "keys-of-a-check-that-is-off",
        edit('health_check = { type = "none" }', 'health_check = { type = "none", interval = 5 }'),
        [(f"{SVC}.health_check", 'type = "none", so interval take no effect')],
    ),
    Case(
        "keys-of-a-disabled-rebalancer",
        in_service("rebalance = { enabled = false, tolerance = 0.5 }"),
        [(f"{SVC}.rebalance", "enabled = false, so tolerance take no effect")],
    ),
    Case(
        "keys-of-a-disabled-admin",
        '[admin]\nenabled = false\nlisten = "127.0.0.1:9999"\n' + BASE,
        [("admin", "enabled = false, so listen take no effect")],
    ),
    Case(
        "management-port-without-rabbitmq",
        in_r1("management_port = 15673"),
        [(f"{R1}.management_port", "only used with [services.rabbitmq]")],
    ),
    Case(
        "all-backups",
        in_r1("backup = true").replace("  port = 5674\n", "  port = 5674\n  backup = true\n"),
        [(f"{SVC}.backends", "every backend is a backup")],
    ),
    Case(
        "all-weight-zero",
        in_r1("weight = 0").replace("  port = 5674\n", "  port = 5674\n  weight = 0\n"),
        [(f"{SVC}.backends", "every backend has weight 0")],
    ),
]
