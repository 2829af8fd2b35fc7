"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from comfyfleet import __version__
from comfyfleet.api import errors
from comfyfleet.api.auth import KeyResolver
from comfyfleet.api.middleware import BodyLimitMiddleware, RateLimitHeadersMiddleware
from comfyfleet.api.routes import assets, events, health, jobs, storage, webhooks
from comfyfleet.config import ConfigurationError, Settings
from comfyfleet.runtime import Runtime
from comfyfleet.security.rate_limit import RateLimiter
from comfyfleet.services import BackgroundServices

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, runtime: Runtime | None = None, background: bool = True) -> FastAPI:
    """The API. With ``background`` the process also runs what the settings ask for besides the API
    (local workers, reaper, webhook sender); ``comfyfleet api`` runs the API alone."""
    problems = settings.startup_problems()
    if problems:
        raise ConfigurationError("refusing to start: " + "; ".join(problems))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_runtime = runtime is None
        rt = runtime or await Runtime.create(settings)
        app.state.runtime = rt
        app.state.keys = KeyResolver(rt)
        app.state.limiter = RateLimiter(settings)
        services = BackgroundServices(rt)
        if background:
            await services.start()
        try:
            yield
        finally:
            await services.stop()
            if own_runtime:
                await rt.close()

    app = FastAPI(
        title="comfyfleet",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        # FastAPI's built-in OpenTelemetry costs a span per request; nothing here exports them.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    errors.install(app)
    for router in (health.router, jobs.router, events.router, assets.router, storage.router, webhooks.router):
        app.include_router(router)
    largest_upload = max(plan.max_upload_bytes for plan in settings.plans.values())
    app.add_middleware(RateLimitHeadersMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        limit_for=lambda path: largest_upload + 1024 * 1024 if path == "/api/v2/assets" else None,
    )
    return app
