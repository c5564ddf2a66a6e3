"""ASGI middleware of the service: the request-body limit (413) and one access-log line per request."""
from __future__ import annotations

import json
import logging
import time

from fastapi import HTTPException

LOG = logging.getLogger(__name__)

__all__ = ["BodyLimit", "AccessLog", "send_json"]


class BodyLimit:
    """413 for a request body over ``limit`` bytes: by Content-Length up front, and while streaming."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False  # h11 rejects a malformed Content-Length before we see it
                if too_big:
                    return await send_json(send, 413, {"detail": self._detail()})
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # an HTTPException, so FastAPI's body reader passes it on as is
                    raise TooLarge(413, self._detail())
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except TooLarge:
            if started:
                raise
            await send_json(send, 413, {"detail": self._detail()})

    def _detail(self) -> str:
        return f"request body exceeds the limit of {self.limit} bytes."


class TooLarge(HTTPException):
    pass


class AccessLog:
    """One log line per request: method, path, status, milliseconds."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            LOG.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, (time.perf_counter() - t0) * 1e3)


async def send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
