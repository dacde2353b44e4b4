"""API-key auth: `Authorization: Bearer <key>` on every route but /health when a key is set,
compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request, WebSocket
from fastapi.responses import JSONResponse

from server.errors import ApiError
from server.settings import Settings, get_settings


def authorized(header: str | None, settings: Settings) -> bool:
    if settings.api_key is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    expected = settings.api_key.get_secret_value().encode()
    # compare even when the scheme is wrong, so the time taken says nothing about the key
    matches = hmac.compare_digest(given.strip().encode(), expected)
    return matches and scheme.lower() == "bearer"


def require_api_key(request: Request, settings: Settings = Depends(get_settings)) -> None:
    if not authorized(request.headers.get("authorization"), settings):
        raise ApiError("unauthorized", "missing or wrong API key; send 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})


async def deny_websocket(websocket: WebSocket) -> None:
    """Refuse the handshake with HTTP 401 (clients see the status, not a dropped socket)."""
    error = ApiError("unauthorized", "missing or wrong API key; send 'Authorization: Bearer <key>'",
                     headers={"WWW-Authenticate": "Bearer"})
    response: JSONResponse = error.response()
    await websocket.send_denial_response(response)
