"""Liveness (``/api/v2/health``, contract) and readiness (``/readyz``: the database answers)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import text

from comfyfleet import __version__
from comfyfleet.api.deps import get_runtime
from comfyfleet.api.responses import Json

router = APIRouter(tags=["health"])


@router.get("/api/v2/health")
async def health() -> Json:
    return Json({"status": "ok", "version": __version__})


@router.get("/readyz")
async def readyz(request: Request) -> Json:
    runtime = get_runtime(request)
    checks: dict[str, Any] = {}
    ready = True
    try:
        async with runtime.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # readiness reports, it never raises
        checks["database"] = f"unreachable: {type(exc).__name__}"
        ready = False
    supervisor = runtime.extras.get("supervisor")
    if supervisor is not None:
        status = supervisor.status()
        checks["comfyui"] = {
            "mode": status.mode,
            "mode_reason": status.mode_reason,
            "ready": status.ready,
            "slots": [asdict(slot) for slot in status.slots],
        }
    return Json({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
