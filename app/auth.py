"""Who is asking: the `Authorization: Bearer <key>` header checked against the keys file.

With BAILAN_API_KEYS_FILE set, every job route and /v1/models need a key
listed there (bailan.keys); a missing or unknown key is a 401 with
`WWW-Authenticate: Bearer`. Without it the API is in open mode, for local use:
every request is the one `anonymous` key, which sees every job. /healthz and
/readyz never ask (probes carry no keys).

Routes take the caller as `AuthDep` (app.deps), so tests can override it.
"""

from __future__ import annotations

from fastapi import HTTPException, Request, status
from fastapi.security import HTTPBearer

from bailan.keys import OPEN_MODE, KeyRing, Principal

REALM = "bailan"


def _unauthorized(detail: str, error: str | None) -> HTTPException:
    challenge = f'Bearer realm="{REALM}"' + (f', error="{error}"' if error else "")
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": challenge})


class ApiKeyBearer(HTTPBearer):
    """FastAPI's HTTPBearer (the scheme /docs shows, the header parsing) that answers with the
    caller's key.

    One dependency, not a bearer dependency under an authenticating one: every
    route pays FastAPI's cost per dependency solve, and the status path is the
    one that clients call thousands of times a second. auto_error=False, because
    HTTPBearer's own error is a 403 without WWW-Authenticate; the 401 below is
    what RFC 6750 asks for.
    """

    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        """The caller's key; raises 401 when keys are required and none valid was sent."""
        ring: KeyRing | None = request.app.state.keyring
        if ring is None:
            return OPEN_MODE
        credentials = await super().__call__(request)
        if credentials is None or not credentials.credentials:
            raise _unauthorized("an API key is required: send the header 'Authorization: Bearer <key>'", None)
        principal = ring.lookup(credentials.credentials)
        if principal is None:
            raise _unauthorized("unknown API key", "invalid_token")
        return principal


authenticate = ApiKeyBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from BAILAN_API_KEYS_FILE (`python -m bailan.keys new NAME`). Not needed in open mode.",
)
