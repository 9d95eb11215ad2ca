"""Bearer-token access control of the HTTP API.

Write endpoints (``POST /items/assign``: it adds to the catalogue) always need the token; the read
endpoints need it too when ``serve.auth_reads`` is on; ``/healthz`` never does (probes). The token
comes from the environment variable ``serve.token_env`` or the file ``serve.token_file`` (a mounted
secret) — a config holds only where the token is, never the token. Each replica of the ingress reads
it when it starts, so the value never travels in a deployment's arguments (which Serve stores).

Only a SHA-256 digest of the token is kept in memory; a presented token is hashed and compared with
:func:`hmac.compare_digest` (constant time, and equal lengths whatever the token). Neither is ever
logged. Answers carry no detail: 401 (no ``Authorization: Bearer`` header) or 403 (any other token).
A server started without a token refuses every write with 403 and says so.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidforge.platform.config import ConfigError, ServeConfig

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16


class AuthError(Exception):
    """A request without the right token: ``status`` 401 or 403, and a message without detail."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def read_token(s: ServeConfig) -> str | None:
    """The token from ``serve.token_file`` (when set) or ``serve.token_env``; None when neither has one.

    Raises:
        ConfigError: the file is missing or empty, or the token is shorter than 16 characters.
    """
    if s.token_file:
        path = Path(s.token_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"serve.token_file: {path} not found (a file holding the API token)")
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("serve.token_file %s is readable by other users; chmod 600 it", path)
        token = path.read_text().strip()
        where = f"serve.token_file ({path})"
    else:
        token = os.environ.get(s.token_env, "").strip()
        where = f"${s.token_env}"
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{where}: the API token must have at least {MIN_TOKEN_CHARS} characters "
                          "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Auth:
    """Who may call what: the token's digest (None: no token configured) and whether reads need it."""

    digest: bytes | None
    reads: bool = False

    @classmethod
    def from_token(cls, token: str | None, reads: bool = False) -> Auth:
        return cls(None if token is None else _digest(token), reads)

    @classmethod
    def from_config(cls, s: ServeConfig) -> Auth:
        token = read_token(s)
        if s.auth_reads and token is None:
            raise ConfigError(f"serve.auth_reads=true needs a token: set ${s.token_env} or serve.token_file")
        return cls.from_token(token, s.auth_reads)

    def check(self, authorization: str | None, write: bool) -> None:
        """Raise :class:`AuthError` unless ``authorization`` carries the token (or the call is an open read)."""
        if not write and not self.reads:
            return
        if write and self.digest is None:
            raise AuthError(403, "writes are disabled: the server was started without an API token "
                                 "(serve.token_env / serve.token_file)")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise AuthError(401, "this endpoint needs a bearer token (Authorization: Bearer <token>)")
        if self.digest is None or not hmac.compare_digest(_digest(given.strip()), self.digest):
            raise AuthError(403, "the token is not valid for this endpoint")


# (method, path) of the routes that change state, and of the reads ``serve.auth_reads`` protects
WRITES = frozenset({("POST", "/items/assign")})
READS = frozenset({("POST", "/rank"), ("POST", "/recommend"), ("GET", "/version"), ("GET", "/docs"),
                   ("GET", "/redoc"), ("GET", "/openapi.json"), ("GET", "/docs/oauth2-redirect")})


class AuthGate:
    """ASGI middleware: the token check before anything else reads the request (body, JSON, models).

    Args:
        app: the wrapped ASGI app.
        auth: who may call what.
        refuse: ``(status, message, scope, receive, send)`` coroutine that writes the error answer.
    """

    def __init__(self, app: Any, auth: Auth, refuse: Any) -> None:
        self.app, self.auth, self.refuse = app, auth, refuse

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            route = (scope.get("method", ""), scope.get("path", "").rstrip("/") or "/")
            if route in WRITES or route in READS:
                header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
                try:
                    self.auth.check(header, write=route in WRITES)
                except AuthError as e:
                    return await self.refuse(e.status, e.message, scope, receive, send)
        await self.app(scope, receive, send)
