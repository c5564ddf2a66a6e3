"""Who may use the service: the bind check, and bearer tokens compared in constant time."""
from __future__ import annotations

import hmac
import ipaddress
import logging

from fastapi import HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials

from ..errors import IndexInputError

LOG = logging.getLogger(__name__)

__all__ = ["check_bind", "bearer_credentials", "TokenCheck"]


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond the loopback interface without a token (raises IndexInputError)."""
    if token:
        return
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise IndexInputError(f"refusing to listen on {host} without a token: anyone who can reach it could "
                              "read the index; set --token (or NIL_TOKEN), or bind to 127.0.0.1.")


def bearer_credentials(request: Request) -> HTTPAuthorizationCredentials | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=credentials.strip())


class TokenCheck:
    """The server's bearer token (or none): reads need it when set, writes always."""

    def __init__(self, token: str | None):
        self.expected = token.encode() if token else None

    def authorised(self, cred: HTTPAuthorizationCredentials | None) -> bool:
        return cred is not None and hmac.compare_digest(cred.credentials.encode(), self.expected)

    @staticmethod
    def unauthorised() -> HTTPException:
        return HTTPException(401, "missing or wrong bearer token.", headers={"WWW-Authenticate": "Bearer"})

    def check_read(self, cred: HTTPAuthorizationCredentials | None) -> None:
        """Raise 401 when a token is set and cred does not carry it."""
        if self.expected is not None and not self.authorised(cred):
            raise self.unauthorised()

    def check_write(self, cred: HTTPAuthorizationCredentials | None, writable: bool) -> None:
        """Raise 403 without a server token, 401 for a wrong one, 409 on a read-only server."""
        if self.expected is None:
            raise HTTPException(403, "this server has no token, so writes are disabled; start it with --token "
                                     "(or NIL_TOKEN).")
        if not self.authorised(cred):
            raise self.unauthorised()
        if not writable:
            raise HTTPException(409, "this server is read-only (several worker processes each hold their own "
                                     "copy of the index); serve with --workers 1 to upsert or snapshot.")
