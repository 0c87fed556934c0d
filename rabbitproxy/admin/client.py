"""A small, synchronous client for the admin API, used by the ``status``, ``backend``, ``reload`` and
``connections`` commands.

It uses the standard library only: a CLI command makes one or two requests and exits, so an event loop and a
session would be all cost and no gain.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from rabbitproxy.addresses import format_host_port

DEFAULT_ADMIN_URL = "http://127.0.0.1:9080"
# Closing a connection through the broker may ask several nodes, and asks again for a few seconds while the
# management API has not learnt of a young connection yet (rabbitproxy.control.closer, BrokerCloser.close_one).
CLOSE_TIMEOUT = 60.0
# A reload waits for the new services' first health checks (up to their timeout plus a second) and for every
# worker's answer; the caller must see its outcome, not a timeout that looks like a refusal.
RELOAD_TIMEOUT = 120.0
UNIX_PREFIX = "unix:"


class AdminError(Exception):
    """The admin API could not be reached or refused the request; ``str()`` is a message for people."""

    def __init__(self, message: str, status: int | None = None, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.errors = errors or []


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the admin API's unix socket (``[admin] socket``); the Host header is only a formality there."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    """``url`` is ``http://host:port``, ``https://...``, ``host:port`` or ``unix:/path/to/admin.sock``.

    Requests go straight to the admin API with :mod:`http.client`: never through an HTTP proxy named by the
    environment (``http_proxy``, ``HTTPS_PROXY``, ``ALL_PROXY``), which would receive the bearer token and would in
    any case be the wrong way to reach an API that listens on this host or its own network.
    """

    def __init__(self, url: str = DEFAULT_ADMIN_URL, token: str | None = None, timeout: float = 10.0) -> None:
        self.socket_path: str | None = None
        if url.startswith(UNIX_PREFIX):
            self.socket_path = url[len(UNIX_PREFIX) :]
            if not self.socket_path:
                raise AdminError(f"{url!r}: give the socket's path, as in unix:/run/rabbitproxy/admin.sock")
            self.url = url
        else:
            if "://" not in url:
                url = "http://" + url
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise AdminError(f"{url!r} is not an http:// or https:// URL, nor unix:PATH, of the admin API")
            self.url = url.rstrip("/")
        self.token = token or None
        self.timeout = timeout

    def _connection(self, timeout: float) -> tuple[http.client.HTTPConnection, str]:
        """A connection to the API and the path prefix of its URL."""
        if self.socket_path is not None:
            return UnixHTTPConnection(self.socket_path, timeout), ""
        parts = urlsplit(self.url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        return cls(parts.netloc, timeout=timeout), parts.path

    def request(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn, prefix = self._connection(timeout or self.timeout)
        try:
            conn.request(method, prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise AdminError(f"cannot reach the admin API at {self.url}: {exc}") from None
        finally:
            conn.close()
        if resp.status >= 400:
            raise _http_error(resp.status, raw)
        try:
            return json.loads(raw or b"null")
        except ValueError as exc:
            raise AdminError(f"the admin API at {self.url} answered something that is not JSON: {exc}") from None

    def services(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/api/services")
        return result

    def set_backend(
        self,
        service: str,
        backend: str,
        *,
        state: str | None = None,
        weight: int | None = None,
        deadline: float | None = None,
        force: bool = False,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if state is not None:
            body["state"] = state
        if weight is not None:
            body["weight"] = weight
        if deadline is not None:
            body["deadline"] = deadline
        if force:
            body["force"] = True
        path = f"/api/services/{quote(service, safe='')}/backends/{quote(backend, safe='')}"
        result: dict[str, Any] = self.request("PATCH", path, body)
        return result

    def reset_backend(self, service: str, backend: str) -> dict[str, Any]:
        """Drop the runtime weight override of a backend: the configuration's weight applies again."""
        path = f"/api/services/{quote(service, safe='')}/backends/{quote(backend, safe='')}/reset"
        result: dict[str, Any] = self.request("POST", path, {})
        return result

    def reload(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/api/reload", {}, timeout=max(self.timeout, RELOAD_TIMEOUT))
        return result

    def connections(self, **params: str | int | None) -> dict[str, Any]:
        """``GET /api/connections`` with the filters, sort and page given (None = not given)."""
        query = urlencode({k: v for k, v in params.items() if v is not None})
        result: dict[str, Any] = self.request("GET", "/api/connections" + (f"?{query}" if query else ""))
        return result

    def close_connection(self, conn_id: int, reason: str | None = None) -> dict[str, Any]:
        query = f"?{urlencode({'reason': reason})}" if reason else ""
        result: dict[str, Any] = self.request("DELETE", f"/api/connections/{conn_id}{query}", timeout=CLOSE_TIMEOUT)
        return result


def _http_error(status: int, raw: bytes) -> AdminError:
    message = f"HTTP {status}"
    errors: list[str] = []
    try:
        payload = json.loads(raw or b"null")
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        message = str(payload.get("error", message))
        listed = payload.get("errors")
        if isinstance(listed, list):
            errors = [str(e) for e in listed]
    if status == 401:
        message += " (give --token or set RABBITPROXY_ADMIN_TOKEN)"
    if isinstance(payload, dict) and isinstance(payload.get("queues"), list):
        errors.extend(f"quorum queue at risk: {q}" for q in payload["queues"])
    return AdminError(message, status, errors)


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


_STATUS_STYLE = {
    "up": "bold green",
    "down": "bold red",
    "drain": "bold yellow",
    "maint": "bold bright_black",
    "maintenance": "bold blue",
}


def rabbitmq_text(node: dict[str, Any] | None) -> str:
    """One short line for a backend's ``rabbitmq`` section: node, version, alarms, maintenance, API trouble."""
    if node is None:
        return "-"
    words: list[str] = [node.get("node") or "node unknown"]
    if node.get("version"):
        words.append(str(node["version"]))
    words.extend(f"{kind.upper()} ALARM" for kind in node.get("alarms", []))
    if node.get("maintenance"):
        words.append("MAINTENANCE")
    mgmt = node.get("management") or {}
    if mgmt.get("status") not in (None, "ok"):
        words.append(f"(management API {mgmt['status']}: {mgmt.get('detail') or '?'})")
    fd, mem = node.get("fd"), node.get("memory")
    if fd and mem and fd.get("used") is not None and mem.get("used") is not None:
        words.append(f"fd {fd['used']}/{fd.get('total')} mem {_bytes(mem['used'])}")
    return " ".join(words)


def print_status(data: dict[str, Any]) -> None:
    """Print ``GET /api/services`` as one table per service (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        # Piped into less, grep or a file: do not squeeze the table into 80 columns.
        console = Console(highlight=False, width=200)
    console.print(f"proxy {data.get('state', '?')}")
    for svc in data.get("services", []):
        conns = svc["connections"]
        title = (
            f"{svc['name']}  listen {svc['listen']}  {svc['balance']}  "
            f"{conns['active']} open / {conns['total']} total{'' if svc['accepting'] else '  NOT ACCEPTING'}"
        )
        table = Table(title=title, title_justify="left")
        numeric = ("weight", "eff.", "active", "total", "in", "out")
        with_rabbitmq = any(b.get("rabbitmq") is not None for b in svc["backends"])
        extra = ("rabbitmq",) if with_rabbitmq else ()
        for col in ("backend", "address", "status", "health", "weight", "eff.", "agent", *extra, *numeric[2:]):
            table.add_column(col, justify="right" if col in numeric else "left")
        for b in svc["backends"]:
            agent = b["agent"]
            agent_text = "-" if agent["status"] == "none" else f"{agent['status']} {agent['reply'] or ''}".strip()
            if agent.get("detail"):
                agent_text += f" ({agent['detail']})"
            weight = f"{b['weight']}*" if b["weight_overridden"] else str(b["weight"])
            table.add_row(
                b["name"] + (" (backup)" if b["backup"] else ""),
                format_host_port(b["address"], b["port"]),
                f"[{_STATUS_STYLE.get(b['status'], '')}]{b['status']}[/]",
                b["health"]["detail"] or b["health"]["status"],
                weight,
                str(b["effective_weight"]),
                # The agent's words and the reason it is stale are text from outside: never rich markup.
                escape(agent_text),
                # So are the node's name and the management API's complaint.
                *((escape(rabbitmq_text(b.get("rabbitmq"))),) if with_rabbitmq else ()),
                str(b["connections"]["active"]),
                str(b["connections"]["total"]),
                _bytes(b["bytes"]["in"]),
                _bytes(b["bytes"]["out"]),
            )
        console.print(table)
    console.print("* weight set at runtime through the admin API")


def _seconds(value: float | None) -> str:
    """A duration for people: 42s, 3m05s, 2h07m, 4d03h; "-" when unknown."""
    if value is None:
        return "-"
    n = int(value)
    if n < 60:
        return f"{n}s"
    if n < 3600:
        return f"{n // 60}m{n % 60:02d}s"
    if n < 86400:
        return f"{n // 3600}h{n % 3600 // 60:02d}m"
    return f"{n // 86400}d{n % 86400 // 3600:02d}h"


def print_connections(data: dict[str, Any]) -> None:
    """Print ``GET /api/connections`` as a table (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=220)
    conns = data.get("connections", [])
    table = Table(title_justify="left")
    numeric = ("id", "worker", "age", "idle", "in", "out")
    # With workers = N each connection lives in one worker process; a single process has no such column.
    workers = any("worker" in c for c in conns)
    columns = ("id", "worker") if workers else ("id",)
    for col in (*columns, "service", "backend", "client", "user", "vhost", "name", "client library", *numeric[2:]):
        table.add_column(col, justify="right" if col in numeric else "left")
    for c in conns:
        library = " ".join(p for p in (c.get("product"), c.get("version")) if p)
        table.add_row(
            str(c["id"]),
            *((str(c.get("worker", "-")),) if workers else ()),
            c["service"],
            c["backend"] or "(connecting)",
            c["client"],
            # Everything below comes from the client's handshake: text, never rich markup.
            escape(c.get("user") or "-"),
            escape(c.get("vhost") or "-"),
            escape(c.get("connection_name") or "-"),
            escape(library or "-"),
            _seconds(c["age"]),
            _seconds(c["idle"]),
            _bytes(c["bytes_in"]),
            _bytes(c["bytes_out"]),
        )
    console.print(table)
    total = data.get("total", len(conns))
    first = data.get("offset", 0)
    shown = f"{first + 1}-{first + len(conns)}" if conns else "none"
    line = f"{shown} of {total} connection(s), by {data.get('sort', 'age')} {data.get('order', 'desc')}"
    if data.get("next_offset") is not None:
        line += f"; more with --offset {data['next_offset']}"
    console.print(line)
