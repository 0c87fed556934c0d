"""HAProxy ``server`` and ``default-server`` lines, read into what a rabbitproxy backend can carry.

Each keyword either lands in :class:`ServerParams` or is reported (file:line, the keyword, why) through the
``warn`` callback. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from rabbitproxy.migrate.haproxy import parse_time

Warn = Callable[[int, str], None]

# Keywords taking no value; ``no-X`` turns X off again (after a default-server that set it).
_FLAGS = frozenset(
    {"backup", "check", "agent-check", "send-proxy", "send-proxy-v2", "ssl", "disabled", "enabled", "check-ssl"}
    | {"check-send-proxy", "tfo", "allow-0rtt", "no-tls-tickets", "tls-tickets", "non-stick", "stick", "ws"}
    | {"force-sslv3", "force-tlsv10", "force-tlsv11", "force-tlsv12", "force-tlsv13", "ssl-reuse", "no-ssl-reuse"}
)
# Keywords the converter reads and their meaning for a message; every other valued keyword is reported.
_UNCARRIED = {
    "fastinter": "rabbitproxy checks at one interval whatever the state",
    "downinter": "rabbitproxy checks at one interval whatever the state",
    "addr": "checks go to the backend's own address (check_port may differ)",
    "agent-addr": "the agent is asked on the backend's own address",
    "agent-send": "rabbitproxy's agent client sends nothing; the agent answers on connect",
    "on-marked-up": "backup connections are not cut when a regular backend comes back",
    "on-error": "a failed check counts as one failed check",
    "error-limit": "traffic errors do not mark a backend down",
    "observe": "traffic errors do not mark a backend down",
    "track": "each backend is checked on its own",
    "cookie": 'no HTTP cookies in TCP mode; balance = "source-hash" gives affinity',
    "id": "backends are named, not numbered",
    "resolvers": "names are resolved by the system resolver at each connect",
    "init-addr": "names are resolved by the system resolver at each connect",
    "resolve-prefer": "names are resolved by the system resolver at each connect",
    "minconn": "one connection limit per backend (max_connections)",
    "maxqueue": "connections are not queued; a full backend is skipped",
    "source": "source_address is a service setting",
    "ca-file": "set backend_tls_ca to the CA file on the proxy host",
    "crt": "client certificates towards the backends are not supported",
    "sni": "backend_tls_server_name is a fixed name per service",
    "verify": "only 'none' and 'required' carry over",
}


@dataclass
class ServerParams:
    """What a rabbitproxy backend (and its service) can take from one server line."""

    weight: int = 1
    backup: bool = False
    check: bool = False
    inter: float = 2.0
    fall: int = 3
    rise: int = 2
    check_port: int | None = None
    agent_check: bool = False
    agent_port: int | None = None
    agent_inter: float = 2.0
    send_proxy: str = "off"
    maxconn: int = 0
    shutdown_sessions: bool = False
    slowstart: float = 0.0
    ssl: bool = False
    verify: str = ""


def _set_flag(params: ServerParams, word: str, line: int, warn: Warn) -> None:
    on = not word.startswith("no-")
    name = word[3:] if not on else word
    if name in ("backup", "check", "ssl"):
        setattr(params, name, on)
    elif name == "agent-check":
        params.agent_check = on
    elif name in ("send-proxy", "send-proxy-v2"):
        params.send_proxy = ("v2" if name.endswith("v2") else "v1") if on else "off"
    elif name == "disabled" and on:
        warn(line, "disabled: the backend starts ready; `rabbitproxy backend maint` puts it in maintenance")
    elif name != "enabled":
        warn(line, f"{word}: no rabbitproxy equivalent, left out")


def _set_value(params: ServerParams, key: str, value: str, line: int, warn: Warn) -> None:
    try:
        if key == "weight":
            params.weight = int(value)
        elif key == "inter":
            params.inter = parse_time(value)
        elif key in ("fall", "rise"):
            setattr(params, key, int(value))
        elif key == "port":
            params.check_port = int(value)
        elif key == "agent-port":
            params.agent_port = int(value)
        elif key == "agent-inter":
            params.agent_inter = parse_time(value)
        elif key == "maxconn":
            params.maxconn = int(value)
        elif key == "slowstart":
            params.slowstart = parse_time(value)
        elif key == "on-marked-down":
            params.shutdown_sessions = value == "shutdown-sessions"
            if value != "shutdown-sessions":
                warn(line, f'on-marked-down {value}: only shutdown-sessions carries over (on_marked_down = "close")')
        elif key == "verify" and value in ("none", "required"):
            params.verify = value
        else:
            warn(line, f"{key} {value}: {_UNCARRIED.get(key, 'no rabbitproxy equivalent')}, left out")
    except ValueError:
        warn(line, f"{key} {value}: not a valid value, left out")


def read_params(words: tuple[str, ...], line: int, base: ServerParams, warn: Warn) -> ServerParams:
    """``base`` (the default-server settings) updated with the keywords of one line."""
    params = dataclasses.replace(base)
    i = 0
    while i < len(words):
        word = words[i]
        if word in _FLAGS or (word.startswith("no-") and word[3:] in _FLAGS):
            _set_flag(params, word, line, warn)
            i += 1
        elif i + 1 < len(words):
            _set_value(params, word, words[i + 1], line, warn)
            i += 2
        else:
            warn(line, f"{word}: a keyword without its value, left out")
            i += 1
    return params
