"""Webhook behaviour for API callers: endpoints (CRUD, secret rotation), the tenant's signing secret for
per-job ``webhook_url`` deliveries, delivery logs and redelivery, and the submit-time URL check.

Functions take a connection inside the caller's transaction and the authenticated tenant; they never
commit (the endpoint's unit of work does). URLs are judged by the SSRF guard here, when the tenant
hands them over, and again by the guarded client at every delivery (DNS can change in between).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.config import Settings
from comfyfleet.errors import Conflict, NotFound, ValidationFailed
from comfyfleet.security.ssrf import UrlFetchFailed, check_url
from comfyfleet.security.url_policy import url_policy
from comfyfleet.tenants.repository import Tenant
from comfyfleet.timeutil import utcnow
from comfyfleet.webhooks import repository as repo
from comfyfleet.webhooks.outbox import DEFAULT_EVENTS, EVENT_TYPES
from comfyfleet.webhooks.repository import DeliveryRow, EndpointRow
from comfyfleet.webhooks.secrets import encrypt_secret, generate_secret

log = logging.getLogger(__name__)

# During this window after a rotation both secrets sign, so receivers can switch without a gap.
ROTATION_OVERLAP = timedelta(hours=24)
# Fan-out per event is one delivery per endpoint; bound it.
MAX_ENDPOINTS_PER_TENANT = 20
MAX_URL_LENGTH = 2048
MAX_DESCRIPTION_LENGTH = 500
# Resolving a tenant's URL at submit time must not hold a request for long.
SUBMIT_RESOLVE_TIMEOUT_S = 5.0

_JOB_URL_SECRET_NAMESPACE = uuid.UUID("5b0d7c36-3f0e-4a59-9a40-6d1c2b8f1e27")


# ---------------------------------------------------------------- URLs


async def check_webhook_url(settings: Settings, url: object, tenant: Tenant) -> str:
    """A webhook URL the guard accepts, or ``UrlNotAllowed`` (422 ``url_not_allowed``, with the reason).

    A host that does not resolve right now is accepted: DNS may be briefly unavailable or not set up
    yet, and nothing is sent to a host that was not vetted at connect time anyway.
    """
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise ValidationFailed(
            f"'url' must be a URL of at most {MAX_URL_LENGTH} characters", code="invalid_request"
        )
    try:
        await check_url(
            url, url_policy(settings, tenant.url_allowed_domains), timeout=SUBMIT_RESOLVE_TIMEOUT_S
        )
    except UrlFetchFailed as exc:
        log.info("webhook URL accepted without resolving it now: %s", exc.reason)
    return url


async def require_job_url_secret(conn: AsyncConnection, tenant_id: str) -> None:
    row = await repo.get_endpoint(conn, tenant_id, job_url_secret_id(tenant_id), kind=repo.KIND_JOB_URL)
    if row is None:
        raise ValidationFailed(
            "Per-job webhook_url deliveries are signed with the tenant's job URL secret; create it first "
            "with POST /api/v2/webhooks/job-url-secret",
            code="webhook_secret_missing",
        )


# ---------------------------------------------------------------- request bodies


@dataclass(frozen=True)
class EndpointChanges:
    url: str | None = None
    events: list[str] | None = None
    description: str | None = None
    enabled: bool | None = None
    fields: frozenset[str] = frozenset()


_FIELDS = frozenset({"url", "events", "description", "enabled"})


@dataclass(frozen=True)
class VettedChanges:
    """``EndpointChanges`` whose URL (if any) the SSRF guard accepted. Only this type is written, so an
    unchecked URL cannot reach the table; vetting resolves DNS, so do it before opening a transaction."""

    changes: EndpointChanges


async def vet_changes(settings: Settings, tenant: Tenant, changes: EndpointChanges) -> VettedChanges:
    if "url" in changes.fields:
        await check_webhook_url(settings, changes.url, tenant)
    return VettedChanges(changes)


def parse_endpoint_body(body: object, *, creating: bool) -> EndpointChanges:
    if not isinstance(body, dict):
        raise ValidationFailed("The request body must be a JSON object", code="invalid_request")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise ValidationFailed(
            f"Unknown field(s): {', '.join(unknown)}", code="invalid_request", details={"fields": unknown}
        )
    if creating and "url" not in body:
        raise ValidationFailed("'url' is required", code="invalid_request")
    events = _parse_events(body["events"]) if "events" in body else None
    description = body.get("description")
    if description is not None and (
        not isinstance(description, str) or len(description) > MAX_DESCRIPTION_LENGTH
    ):
        raise ValidationFailed(
            f"'description' must be a string of at most {MAX_DESCRIPTION_LENGTH} characters",
            code="invalid_request",
        )
    enabled = body.get("enabled")
    if "enabled" in body and not isinstance(enabled, bool):
        raise ValidationFailed("'enabled' must be true or false", code="invalid_request")
    url = body.get("url")
    if "url" in body and not isinstance(url, str):
        raise ValidationFailed("'url' must be a string", code="invalid_request")
    return EndpointChanges(
        url=url, events=events, description=description, enabled=enabled, fields=frozenset(body)
    )


def _parse_events(raw: object) -> list[str]:
    if not isinstance(raw, list) or not raw or not all(isinstance(e, str) for e in raw):
        raise ValidationFailed(
            "'events' must be a non-empty list of event types",
            code="invalid_request",
            details={"valid": list(EVENT_TYPES)},
        )
    unknown = sorted(set(raw) - set(EVENT_TYPES))
    if unknown:
        raise ValidationFailed(
            f"Unknown event type(s): {', '.join(unknown)}",
            code="invalid_request",
            details={"valid": list(EVENT_TYPES)},
        )
    return [e for e in EVENT_TYPES if e in raw]


# ---------------------------------------------------------------- endpoints


async def create_endpoint(
    conn: AsyncConnection, settings: Settings, tenant: Tenant, vetted: VettedChanges
) -> tuple[EndpointRow, str]:
    """A new endpoint and its secret; the secret is returned here and never again."""
    changes, url = vetted.changes, vetted.changes.url
    if url is None:
        raise ValidationFailed("'url' is required", code="invalid_request")
    if await repo.count_endpoints(conn, tenant.id) >= MAX_ENDPOINTS_PER_TENANT:
        raise Conflict(
            f"A tenant has at most {MAX_ENDPOINTS_PER_TENANT} webhook endpoints", code="endpoint_limit"
        )
    now, endpoint_id, secret = utcnow(), str(uuid.uuid4()), generate_secret()
    await repo.insert_endpoint(
        conn,
        {
            "id": endpoint_id,
            "tenant_id": tenant.id,
            "kind": repo.KIND_ENDPOINT,
            "url": url,
            "description": changes.description,
            "events": changes.events or list(DEFAULT_EVENTS),
            "secret": encrypt_secret(settings, secret, row_id=endpoint_id),
            "previous_secret": None,
            "previous_secret_expires_at": None,
            "enabled": True if changes.enabled is None else changes.enabled,
            "disabled_reason": None,
            "created_at": now,
            "updated_at": now,
        },
    )
    return await get_endpoint(conn, tenant.id, endpoint_id), secret


async def get_endpoint(conn: AsyncConnection, tenant_id: str, endpoint_id: str) -> EndpointRow:
    endpoint = await repo.get_endpoint(conn, tenant_id, endpoint_id) if _is_uuid(endpoint_id) else None
    if endpoint is None:
        raise NotFound("Webhook endpoint not found")
    return endpoint


async def update_endpoint(
    conn: AsyncConnection, tenant_id: str, endpoint_id: str, vetted: VettedChanges
) -> EndpointRow:
    changes = vetted.changes
    current = await get_endpoint(conn, tenant_id, endpoint_id)
    values: dict[str, Any] = {"updated_at": utcnow()}
    if "url" in changes.fields:
        values["url"] = changes.url
    if changes.events is not None:
        values["events"] = changes.events
    if "description" in changes.fields:
        values["description"] = changes.description
    if changes.enabled is not None and changes.enabled != current.enabled:
        values["enabled"] = changes.enabled
        values["disabled_reason"] = None if changes.enabled else "disabled by the tenant"
        if not changes.enabled:
            # Parked, not lost: each can be redelivered once the endpoint is back on.
            await repo.disable_pending(conn, tenant_id, current.id)
    updated = await repo.update_endpoint(conn, tenant_id, current.id, values)
    assert updated is not None  # the row was read in this transaction
    return updated


async def delete_endpoint(conn: AsyncConnection, tenant_id: str, endpoint_id: str) -> None:
    if not _is_uuid(endpoint_id) or not await repo.delete_endpoint(conn, tenant_id, endpoint_id):
        raise NotFound("Webhook endpoint not found")


async def rotate_endpoint_secret(
    conn: AsyncConnection, settings: Settings, tenant_id: str, endpoint_id: str
) -> tuple[EndpointRow, str]:
    current = await get_endpoint(conn, tenant_id, endpoint_id)
    return await _rotate(conn, settings, current)


async def _rotate(conn: AsyncConnection, settings: Settings, current: EndpointRow) -> tuple[EndpointRow, str]:
    """New secret now; the one it replaces keeps signing for ``ROTATION_OVERLAP``. Rotating again inside
    the window drops the oldest: only the two most recent secrets are ever valid."""
    now, secret = utcnow(), generate_secret()
    values = {
        "secret": encrypt_secret(settings, secret, row_id=current.id),
        "previous_secret": current.secret,  # ciphertext bound to the same row id, so it moves as is
        "previous_secret_expires_at": now + ROTATION_OVERLAP,
        "updated_at": now,
    }
    updated = await repo.update_endpoint(conn, current.tenant_id, current.id, values, kind=current.kind)
    assert updated is not None
    return updated, secret


# ---------------------------------------------------------------- the per-job URL secret


def job_url_secret_id(tenant_id: str) -> str:
    # Derived from the tenant, so a tenant has at most one and a concurrent create hits the primary key.
    return str(uuid.uuid5(_JOB_URL_SECRET_NAMESPACE, tenant_id))


async def get_job_url_secret(conn: AsyncConnection, tenant_id: str) -> EndpointRow:
    row = await repo.get_endpoint(conn, tenant_id, job_url_secret_id(tenant_id), kind=repo.KIND_JOB_URL)
    if row is None:
        raise NotFound("This tenant has no job URL secret yet")
    return row


async def create_job_url_secret(
    conn: AsyncConnection, settings: Settings, tenant_id: str
) -> tuple[EndpointRow, str]:
    row_id = job_url_secret_id(tenant_id)
    if await repo.get_endpoint(conn, tenant_id, row_id, kind=repo.KIND_JOB_URL) is not None:
        raise Conflict("The job URL secret exists; rotate it to get a new one", code="already_exists")
    now, secret = utcnow(), generate_secret()
    try:
        await repo.insert_endpoint(
            conn,
            {
                "id": row_id,
                "tenant_id": tenant_id,
                "kind": repo.KIND_JOB_URL,
                "url": "",
                "description": None,
                "events": list(DEFAULT_EVENTS),
                "secret": encrypt_secret(settings, secret, row_id=row_id),
                "previous_secret": None,
                "previous_secret_expires_at": None,
                "enabled": True,
                "disabled_reason": None,
                "created_at": now,
                "updated_at": now,
            },
        )
    except IntegrityError as exc:  # a concurrent create won
        raise Conflict(
            "The job URL secret exists; rotate it to get a new one", code="already_exists"
        ) from exc
    return await get_job_url_secret(conn, tenant_id), secret


async def rotate_job_url_secret(
    conn: AsyncConnection, settings: Settings, tenant_id: str
) -> tuple[EndpointRow, str]:
    return await _rotate(conn, settings, await get_job_url_secret(conn, tenant_id))


# ---------------------------------------------------------------- deliveries


async def get_delivery(conn: AsyncConnection, tenant_id: str, delivery_id: str) -> DeliveryRow:
    delivery = await repo.get_delivery(conn, tenant_id, delivery_id) if len(delivery_id) <= 40 else None
    if delivery is None:
        raise NotFound("Webhook delivery not found")
    return delivery


def parse_delivery_status(raw: str | None) -> str | None:
    if raw is not None and raw not in repo.DELIVERY_STATUSES:
        raise ValidationFailed(
            f"Unknown delivery status: {raw}",
            code="invalid_request",
            details={"valid": list(repo.DELIVERY_STATUSES)},
        )
    return raw


async def redeliver(conn: AsyncConnection, tenant_id: str, delivery_id: str, *, now: datetime) -> DeliveryRow:
    """Send a delivery again, whatever became of it, with the same webhook-id and a fresh schedule."""
    delivery = await get_delivery(conn, tenant_id, delivery_id)
    if delivery.endpoint_id is not None:
        endpoint = await repo.get_endpoint(conn, tenant_id, delivery.endpoint_id)
        if endpoint is None or not endpoint.enabled:
            raise Conflict(
                "The endpoint is disabled; enable it before redelivering", code="endpoint_disabled"
            )
    requeued = await repo.requeue_delivery(conn, tenant_id, delivery.id, now=now)
    if requeued is None:
        raise Conflict("The delivery is being sent right now; try again shortly", code="delivery_in_flight")
    return requeued


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
