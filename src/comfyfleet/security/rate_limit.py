"""Per-key rate limits (plan settings) and per-address limits on failed authentication, with the
``limits`` package's async API: in-process memory embedded, Redis when several processes serve.

Answers carry the IETF RateLimit headers (draft-ietf-httpapi-ratelimit-headers):
``RateLimit-Policy: "submit";q=60;w=60`` and ``RateLimit: "submit";r=59;t=42``; a refusal is 429
``rate_limited`` with ``Retry-After``.
"""

from __future__ import annotations

import math
import time
from typing import Literal

from fastapi import Request
from limits import RateLimitItem, parse
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from comfyfleet.config import Settings
from comfyfleet.errors import TooManyRequests

Kind = Literal["submit", "read", "auth"]


def storage_uri(configured: str) -> str:
    return configured if configured.startswith("async+") else f"async+{configured}"


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        self._storage = storage_from_string(storage_uri(settings.rate_limit_storage))
        # A sliding window counter costs O(1) per hit; a moving window keeps every timestamp.
        self._limiter = SlidingWindowCounterRateLimiter(self._storage)
        self._auth_item = parse(settings.auth_failure_rate)
        self._items: dict[str, RateLimitItem] = {}

    def _item(self, rate: str) -> RateLimitItem:
        item = self._items.get(rate)
        if item is None:
            item = self._items[rate] = parse(rate)
        return item

    async def check(self, request: Request, *, kind: Kind, rate: str, identity: str) -> None:
        """Count one request of ``identity`` against ``rate``; 429 when over."""
        item = self._item(rate)
        allowed = await self._limiter.hit(item, kind, identity)
        stats = await self._limiter.get_window_stats(item, kind, identity)
        reset_in = max(0, math.ceil(stats.reset_time - time.time()))
        window = item.get_expiry()
        headers = {
            "RateLimit-Policy": f'"{kind}";q={item.amount};w={window}',
            "RateLimit": f'"{kind}";r={stats.remaining};t={reset_in}',
        }
        request.state.rate_headers = headers
        if not allowed:
            error = TooManyRequests(
                f"Rate limit exceeded: {rate} for {kind} requests",
                code="rate_limited",
                retry_after=max(1, reset_in),
            )
            error.headers = headers  # type: ignore[attr-defined]
            raise error

    async def hit_auth_failure(self, request: Request) -> None:
        """Failed authentications are limited per client address, so keys cannot be guessed fast."""
        address = request.client.host if request.client else "unknown"
        if not await self._limiter.test(self._auth_item, "auth", address):
            stats = await self._limiter.get_window_stats(self._auth_item, "auth", address)
            raise TooManyRequests(
                "Too many failed authentications from this address",
                code="rate_limited",
                retry_after=max(1, math.ceil(stats.reset_time - time.time())),
            )
        await self._limiter.hit(self._auth_item, "auth", address)

    async def reset(self) -> None:
        await self._storage.reset()  # type: ignore[misc]  # limits types the sync and async storages as one
