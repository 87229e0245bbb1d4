"""The api_token guard: every route but /live and /ready, compared in constant time.

A pure ASGI middleware (no per-request task or body buffering, SSE streams pass
straight through).  The token comes from ``Authorization: Bearer <token>`` or,
for EventSource which cannot set headers, ``?token=<token>``.
"""

from __future__ import annotations

import hmac
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/live", "/ready"})
_BODY = b'{"detail":"missing or invalid token"}'


def token_from(scope: Scope) -> bytes | None:
    """The token a request presents (header first), or None."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, credentials = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return bytes(credentials).strip()
    query: bytes = scope.get("query_string", b"")
    if b"token=" in query:
        for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if key == "token":
                return value.encode("latin-1")
    return None


class TokenGuard:
    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        presented = token_from(scope)
        if presented is not None and hmac.compare_digest(presented, self.token):
            await self.app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_BODY)).encode()),
                    (b"www-authenticate", b'Bearer realm="api_server"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _BODY})
