"""Webhook endpoints and per-job webhook URLs (filled in by the webhooks work)."""

from __future__ import annotations

from comfyfleet.runtime import Runtime
from comfyfleet.tenants.repository import Tenant


async def validate_webhook_url(runtime: Runtime, url: str, tenant: Tenant) -> None:
    return None
