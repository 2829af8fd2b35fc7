"""Response bodies of the webhook API (our extension to the Comfy API v2 contract). Plain dicts, like
the job bodies; secrets appear only where the service passes one in (create and rotate)."""

from __future__ import annotations

from typing import Any

from comfyfleet.timeutil import isoformat
from comfyfleet.webhooks.repository import PENDING, AttemptRow, DeliveryRow, EndpointRow

# What the attempt log shows of a receiver's answer; the sender reads at most 64 KiB of it.
EXCERPT_SHOWN = 1024


def endpoint_body(endpoint: EndpointRow, *, secret: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": endpoint.id,
        "url": endpoint.url,
        "description": endpoint.description,
        "events": list(endpoint.events),
        "enabled": endpoint.enabled,
        "disabled_reason": endpoint.disabled_reason,
        "previous_secret_expires_at": isoformat(endpoint.previous_secret_expires_at),
        "created_at": isoformat(endpoint.created_at),
        "updated_at": isoformat(endpoint.updated_at),
    }
    if secret is not None:
        body["secret"] = secret
    return body


def job_url_secret_body(row: EndpointRow, *, secret: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "previous_secret_expires_at": isoformat(row.previous_secret_expires_at),
        "created_at": isoformat(row.created_at),
        "updated_at": isoformat(row.updated_at),
    }
    if secret is not None:
        body["secret"] = secret
    return body


def attempt_body(attempt: AttemptRow) -> dict[str, Any]:
    excerpt = attempt.response_excerpt
    return {
        "attempted_at": isoformat(attempt.attempted_at),
        "status_code": attempt.status_code,
        "error": attempt.error,
        "duration_ms": attempt.duration_ms,
        "response_excerpt": excerpt[:EXCERPT_SHOWN].decode("utf-8", "replace") if excerpt else None,
    }


def delivery_body(delivery: DeliveryRow, attempts: list[AttemptRow]) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "event_type": delivery.event_type,
        "job_id": delivery.job_id,
        "endpoint_id": delivery.endpoint_id,
        "url": delivery.url,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": isoformat(delivery.next_attempt_at) if delivery.status == PENDING else None,
        "created_at": isoformat(delivery.created_at),
        "delivered_at": isoformat(delivery.delivered_at),
        "attempt_log": [attempt_body(a) for a in attempts],
    }
