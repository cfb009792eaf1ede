"""Who is calling: an API key or a JWT bearer token becomes a Principal (owner, plan, scopes).

JWTs are checked for signature, algorithm, `exp`, `aud` and (when configured) `iss`. The accepted
algorithms follow from the configured key alone: HMAC with a shared secret, or RSA/ECDSA with a public
key, never both, and never `none`, so a token cannot pick its own verification."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from forge.errors import ForgeError

ADMIN_SCOPE = "admin"
HMAC_ALGORITHMS = ["HS256", "HS384", "HS512"]
PUBLIC_KEY_ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"]


class Unauthorized(ForgeError):
    code = "unauthorized"
    status = 401


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    owner: str
    plan: str
    scopes: frozenset[str] = frozenset()

    @property
    def is_admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes


LOCAL = Principal(owner="local", plan="unlimited", scopes=frozenset({ADMIN_SCOPE}))


class Plan(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    requests: Annotated[int, Meta(ge=0, description="accepted per window; 0: no limit")] = 0
    window_s: Annotated[float, Meta(gt=0)] = 3600.0
    max_queued: Annotated[int, Meta(ge=0, description="queued or running at once; 0: no limit")] = 0


DEFAULT_PLANS = {
    "free": Plan(requests=10, window_s=3600, max_queued=3),
    "premium": Plan(requests=100, window_s=3600, max_queued=20),
    "unlimited": Plan(),
}


class KeyRecord(msgspec.Struct, frozen=True):
    owner: str
    plan: str
    scopes: list[str]


class JwtSettings(msgspec.Struct, frozen=True, kw_only=True):
    secret: str = ""
    public_key_file: str = ""
    issuer: str = ""
    audience: str = "chara-forge"
    default_plan: str = "free"


class Authenticator:
    def __init__(
        self,
        enabled: bool,
        verify_key: Callable[[str], KeyRecord | None],
        jwt: JwtSettings,
        local: Principal = LOCAL,
    ) -> None:
        self.enabled = enabled
        self.local = local
        self._verify_key = verify_key
        self._jwt = jwt
        self._jwt_key: str | None = None
        self._algorithms: list[str] = []
        if jwt.public_key_file:
            self._jwt_key, self._algorithms = Path(jwt.public_key_file).read_text(), PUBLIC_KEY_ALGORITHMS
        elif jwt.secret:
            self._jwt_key, self._algorithms = jwt.secret, HMAC_ALGORITHMS

    def principal(self, authorization: str | None, *, basic: bool = False) -> Principal:
        """From an `Authorization: Bearer ...` value, or with `basic` also `Basic` (user = owner, password = the
        key), as AUTOMATIC1111 clients send it (blocking: may read the key table). With auth off, whatever
        the header says, the local user."""
        if not self.enabled:
            return self.local
        scheme, _, token = (authorization or "").partition(" ")
        if basic and scheme.lower() == "basic":
            return self._from_basic(token.strip())
        if scheme.lower() != "bearer" or not token.strip():
            wanted = "Bearer <API key or token> (or Basic owner:key)" if basic else "Bearer <API key or token>"
            raise Unauthorized(f"send Authorization: {wanted}", field="Authorization")
        return self.from_token(token.strip())

    def _from_basic(self, credentials: str) -> Principal:
        try:
            user, _, password = base64.b64decode(credentials, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("Basic credentials must be base64 of owner:key", field="Authorization") from None
        principal = self.from_token(password)
        if principal.owner != user:
            raise Unauthorized("the key does not belong to that user", field="Authorization")
        return principal

    def from_token(self, token: str) -> Principal:
        if not self.enabled:
            return self.local
        if token.startswith("cf_"):
            key = self._verify_key(token)
            if key is None:
                raise Unauthorized("unknown or revoked API key", field="Authorization")
            return Principal(owner=key.owner, plan=key.plan, scopes=frozenset(key.scopes))
        return self._from_jwt(token)

    def _from_jwt(self, token: str) -> Principal:
        import jwt

        if self._jwt_key is None:
            raise Unauthorized("this server takes API keys only", field="Authorization")
        required = ["exp", "sub", "aud"] + (["iss"] if self._jwt.issuer else [])
        try:
            claims = jwt.decode(
                token,
                self._jwt_key,
                algorithms=self._algorithms,
                audience=self._jwt.audience,
                issuer=self._jwt.issuer or None,
                options={"require": required},
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}", field="Authorization") from None
        scopes = claims.get("scope", "")
        return Principal(
            owner=str(claims["sub"]),
            plan=str(claims.get("plan", self._jwt.default_plan)),
            scopes=frozenset(scopes.split() if isinstance(scopes, str) else ()),
        )
