"""Who may call: API keys resolved to a tenant and scopes. Use the ``Authenticator`` dependency with
the scopes an endpoint needs; it is the only way an endpoint learns its tenant."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

from fastapi import Request

from comfyfleet.config import PlanLimits
from comfyfleet.errors import Forbidden, Unauthorized
from comfyfleet.runtime import Runtime
from comfyfleet.tenants import keys as key_codec
from comfyfleet.tenants import repository as tenant_repo
from comfyfleet.tenants.repository import Tenant
from comfyfleet.timeutil import utcnow

# last_used_at is written at most this often per key: a write per request would cost more than the read.
TOUCH_INTERVAL = timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    tenant: Tenant
    key_id: str
    scopes: frozenset[str]
    plan: PlanLimits

    @property
    def tenant_id(self) -> str:
        return self.tenant.id


@dataclass
class _Cached:
    principal: Principal
    digest: str
    until: float


class KeyResolver:
    """Verifies bearer keys, with a short in-process cache (``auth_cache_ttl_s``) so a poll costs no
    key lookup; revocation takes effect within that TTL."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._cache: dict[str, _Cached] = {}
        self._touched: dict[str, float] = {}

    def forget(self) -> None:
        self._cache.clear()

    async def resolve(self, plaintext: str) -> Principal:
        settings = self._runtime.settings
        pepper = settings.secret_bytes("key_pepper")
        lookup = key_codec.parse_lookup(plaintext)
        if lookup is None:
            raise Unauthorized("Invalid API key")
        now = time.monotonic()
        cached = self._cache.get(lookup)
        if cached is not None and cached.until > now:
            if key_codec.digests_match(plaintext, cached.digest, pepper):
                return cached.principal
            raise Unauthorized("Invalid API key")
        async with self._runtime.reader.connect() as conn:
            found = await tenant_repo.key_by_lookup(conn, lookup)
            if found is None or found[0].revoked_at is not None:
                raise Unauthorized("Invalid API key")
            record, tenant = found
            if not key_codec.digests_match(plaintext, record.digest, pepper):
                raise Unauthorized("Invalid API key")
        if self._touched.get(record.id, 0.0) + TOUCH_INTERVAL.total_seconds() < now:
            self._touched[record.id] = now
            # A write transaction of its own: reader connections do not take SQLite's write lock.
            async with self._runtime.engine.begin() as conn:
                await tenant_repo.touch_key(conn, record.id, utcnow())
        principal = Principal(
            tenant=tenant, key_id=record.id, scopes=frozenset(record.scopes), plan=settings.plan(tenant.plan)
        )
        if settings.auth_cache_ttl_s > 0:
            self._cache[lookup] = _Cached(principal, record.digest, now + settings.auth_cache_ttl_s)
        return principal


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return request.headers.get("x-api-key")


class Authenticator:
    """FastAPI dependency: ``Depends(Authenticator("jobs:read"))``. 401 for a missing, unknown or
    revoked key; 403 when the key lacks the scope (``admin`` implies every scope)."""

    def __init__(self, *required_scopes: str) -> None:
        self.required = frozenset(required_scopes)

    async def __call__(self, request: Request) -> Principal:
        state = request.app.state
        token = bearer_token(request)
        if token is None:
            await state.limiter.hit_auth_failure(request)
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'")
        try:
            principal: Principal = await state.keys.resolve(token)
        except Unauthorized:
            await state.limiter.hit_auth_failure(request)
            raise
        if not ("admin" in principal.scopes or self.required <= principal.scopes):
            missing = sorted(self.required - principal.scopes)
            raise Forbidden(
                f"This API key lacks the scope(s): {', '.join(missing)}", details={"missing": missing}
            )
        request.state.principal = principal
        return principal
