"""``rabbitproxy healthcheck``: ask a running proxy's admin API whether it is healthy.

This is what a container ``HEALTHCHECK``, a Kubernetes exec probe or a keepalived ``track_script`` runs. It is a
separate short-lived process, so it uses blocking stdlib HTTP and imports nothing heavy: a probe that runs every few
seconds should cost next to nothing. It talks to the admin address directly and deliberately ignores
``HTTP_PROXY``-style variables, which a container often inherits and which would send the probe somewhere else.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from rabbitproxy.config import DEFAULT_ADMIN_LISTEN, format_host_port, split_host_port

HEALTHZ_PATH = "/healthz"
# /healthz answers with a tiny JSON object; anything much larger is not our admin API.
MAX_BODY = 64 * 1024
# A wildcard listen address cannot be connected to; the probe runs beside the proxy, so loopback reaches it.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@dataclass(frozen=True)
class HealthResult:
    healthy: bool
    detail: str


def admin_url(value: str | None, env: Mapping[str, str], config_listen: str | None = None) -> str:
    """The ``/healthz`` URL to probe.

    ``value`` (``--admin``) wins, then ``RABBITPROXY_ADMIN``, then where the proxy was told to listen, looked up the
    way ``rabbitproxy serve`` looks it up: the config file's ``admin.listen`` (``config_listen``), else
    ``RABBITPROXY_ADMIN_LISTEN``, else the built-in default. Each may be a full URL or a bare ``host:port``.
    Raises ValueError naming the bad value.
    """
    raw = (
        value
        or env.get("RABBITPROXY_ADMIN")
        or config_listen
        or env.get("RABBITPROXY_ADMIN_LISTEN")
        or DEFAULT_ADMIN_LISTEN
    )
    raw = raw.strip()
    if "://" not in raw:
        host, port = split_host_port(raw)
        raw = f"http://{format_host_port(_WILDCARDS.get(host, host), port)}"
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{raw!r}: the admin URL must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{raw!r}: the admin URL has no host")
    try:
        url_port = parts.port
    except ValueError:
        raise ValueError(f"{raw!r}: the admin URL has a bad port") from None
    url_host = _WILDCARDS.get(parts.hostname, parts.hostname)
    netloc = format_host_port(url_host, url_port) if url_port else (f"[{url_host}]" if ":" in url_host else url_host)
    path = parts.path.rstrip("/")
    if not path.endswith(HEALTHZ_PATH):
        path += HEALTHZ_PATH
    return f"{parts.scheme}://{netloc}{path}"


def check(url: str, timeout: float) -> HealthResult:
    """GET ``url``: healthy only on HTTP 200 with a JSON body whose ``status`` is ``"ok"``."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path or HEALTHZ_PATH, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        body = resp.read(MAX_BODY)
    except http.client.HTTPException as exc:
        return HealthResult(False, f"{url}: not an HTTP answer ({type(exc).__name__} {str(exc).strip()!r})")
    except OSError as exc:
        # A timeout is an OSError too; say how long we waited, which "timed out" alone does not.
        reason = f"no answer within {timeout:g}s" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        return HealthResult(False, f"{url}: {reason}")
    finally:
        conn.close()
    status = _status_of(body)
    if resp.status == 200 and status == "ok":
        return HealthResult(True, f"{url}: ok")
    shown = status if status is not None else body[:200].decode("utf-8", "replace").strip() or "(empty body)"
    return HealthResult(False, f"{url}: HTTP {resp.status}, status {shown}")


def _status_of(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    status = data.get("status") if isinstance(data, dict) else None
    return status if isinstance(status, str) else None
