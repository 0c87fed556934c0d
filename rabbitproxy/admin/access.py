"""Who may use the admin API: the bearer token, loopback-only without one, and no foreign Host or Origin.

With a token configured (``[admin] token`` or ``RABBITPROXY_ADMIN_TOKEN``) every ``/api`` and ``/metrics`` request
must carry ``Authorization: Bearer <token>``; ``/healthz`` and the page itself do not (the page asks for the
token). Changes are only accepted as PATCH/POST with a JSON body, which a cross-site HTML form cannot send, and a
browser ``Origin`` that is not this server's own is refused.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from rabbitproxy.admin.common import TOKEN_KEY, error, who
from rabbitproxy.config import TOKEN_ENV, AdminConfig, ConfigError, admin_token_error, is_loopback

log = structlog.get_logger("rabbitproxy.admin")

# TOKEN_ENV and is_loopback are re-exported from here, where callers have always found them.
__all__ = ["TOKEN_ENV", "admin_token", "guard", "is_loopback"]


def admin_token(cfg: AdminConfig, env: Mapping[str, str] | None = None) -> str | None:
    """The bearer token in force (config first, then the environment); ConfigError if one is needed and missing."""
    environ = os.environ if env is None else env
    # The rule itself is the configuration's, so check-config and a reload judge a file exactly as this does.
    problem = admin_token_error(cfg, environ)
    if problem is not None:
        raise ConfigError([problem])
    return cfg.token or environ.get(TOKEN_ENV) or None


def _origin_ok(request: web.Request) -> bool:
    """A browser's Origin must name this very server; non-browser clients send none."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == request.host.lower()


def _host_is_loopback(request: web.Request) -> bool:
    host = urlsplit(f"//{request.host}").hostname or ""
    return is_loopback(host)


@web.middleware
async def guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    token = request.app[TOKEN_KEY]
    path = request.path
    if token is not None and (path.startswith("/api") or path == "/metrics"):
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        # compare_digest: the time taken must not tell an attacker how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            return web.json_response(
                {"error": "a valid bearer token is required (Authorization: Bearer <token>)"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="rabbitproxy"'},
            )
    if token is None and not _host_is_loopback(request):
        # Without a token the API listens on loopback only, so any other Host is a DNS-rebinding page (evil.example
        # resolving to 127.0.0.1) whose Origin matches its own Host and would pass the check below.
        log.warning("admin request refused: foreign Host", host=request.host, who=who(request))
        return error(403, "requests must address the admin API by a loopback address or localhost")
    if request.method not in ("GET", "HEAD", "OPTIONS") and not _origin_ok(request):
        log.warning("admin request refused: foreign origin", origin=request.headers.get("Origin"), who=who(request))
        return error(403, "cross-origin requests are not accepted")
    return await handler(request)
