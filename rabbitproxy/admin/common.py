"""What every admin route shares: the application's keys, JSON errors, the caller's address, the JSON body."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry

if TYPE_CHECKING:
    from rabbitproxy.control.supervisor import Supervisor

PROXY_KEY: web.AppKey[Supervisor] = web.AppKey("proxy")
TOKEN_KEY: web.AppKey[str | None] = web.AppKey("token", str)
READ_TOKEN_KEY: web.AppKey[str | None] = web.AppKey("read_token", str)
REGISTRY_KEY: web.AppKey[CollectorRegistry] = web.AppKey("registry", CollectorRegistry)
# Bodies are a handful of fields; anything bigger is a mistake or an attack.
MAX_BODY = 64 * 1024


def error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def who(request: web.Request) -> str:
    # A caller on the unix socket has no address (aiohttp gives an empty string).
    return request.remote or "the admin socket"


async def json_body(request: web.Request) -> Any:
    """The request's JSON body, or a 400/415 response raised as an exception."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text=json.dumps({"error": "send a JSON body with Content-Type: application/json"}),
            content_type="application/json",
        )
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"body is not valid JSON: {exc}"}), content_type="application/json"
        ) from None
