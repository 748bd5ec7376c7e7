"""Plain ASGI middleware: a request-body size limit (it sees the raw byte stream) and the
pages' self-only Content-Security-Policy."""

from __future__ import annotations

import json

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body reader re-raises it as is
    (it turns any other error while reading into a 400)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body exceeds {max_bytes} bytes")


class BodySizeLimit:
    """Answer 413 to bodies over max_bytes, declared or streamed.

    Content-Length catches honest clients before any byte is read; counting
    the stream catches chunked uploads and lying headers, without ever
    buffering more than the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        has_body = False
        for name, value in scope.get("headers", []):
            if name == b"transfer-encoding":
                has_body = True
            elif name == b"content-length":
                has_body = True
                try:
                    declared = int(value)
                except ValueError:
                    await self._reject(send, 400, "invalid Content-Length header")
                    return
                if declared > self.max_bytes:
                    await self._reject(send, 413, BodyTooLarge(self.max_bytes).detail)
                    return
        if not has_body:
            # HTTP/1.1 frames a body by one of those two headers; without either
            # there is none to count (the polls, most requests).
            await self.app(scope, receive, send)
            return
        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:
            # Normally the app's exception handler already answered; this
            # covers an app that let it through.
            if not response_started:
                await self._reject(send, 413, exc.detail)

    @staticmethod
    async def _reject(send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


# Pages served here load from here only: the docs (and any page after them)
# work offline, and bundled code that reaches for another host (ReDoc draws
# Redocly's logo from its CDN in the sidebar) is stopped by the browser before
# a request leaves the machine. Inline script and style stay allowed: FastAPI's
# docs pages start Swagger UI with an inline script, and ReDoc writes its
# styles inline.
# Paths under it are the API's (app.routes), never HTML.
API_PREFIX = "/v1/"

SELF_ONLY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "worker-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
    ]
)


class SelfOnlyPages:
    """Give every HTML response a Content-Security-Policy that allows this origin only.

    Plain ASGI, like BodySizeLimit, so streamed answers (server-sent events)
    pass through untouched; JSON and images need no policy and get none.
    """

    def __init__(self, app: ASGIApp, policy: str = SELF_ONLY_POLICY) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(API_PREFIX):
            # The API answers JSON, images and event streams, never pages.
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if headers.get("content-type", "").startswith("text/html") and "content-security-policy" not in headers:
                    headers["Content-Security-Policy"] = self.policy
            await send(message)

        await self.app(scope, receive, send_with_policy)
