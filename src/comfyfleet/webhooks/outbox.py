"""The transactional outbox for webhooks.

``enqueue_job_event`` runs inside the transaction of a job's state change (``jobs.events.
record_transition``: API cancel, worker claim and finish, reaper), so the delivery rows exist if and
only if the state change committed. A crash right after the commit loses nothing: the rows wait in
the database until a sender (in this process or another, after a restart) delivers them.

Events: ``job.succeeded``, ``job.failed``, ``job.canceled``, ``job.expired`` for every enabled
endpoint of the job's tenant whose event filter lists them, and for the job's own ``webhook_url``;
``job.started`` (on entering ``running``, once per run) only for endpoints that opted in. Each
(event, destination) pair is one delivery row whose id, ``msg_<uuid>``, is the ``webhook-id`` of
every attempt, so receivers can drop duplicates.

Payload: ``{"type", "timestamp", "data": <the job object>}`` (the Standard Webhooks envelope).
What is rendered when:

- At enqueue time, the job as of the transition: status, error, timestamps, metrics, metadata. These
  are the facts of the event; rendering them later would describe a different moment (a
  ``job.started`` retried after the job finished must still say "running").
- At send time, per attempt: ``outputs`` (their signed URLs live ``url_lifetime_s``, minutes, while
  retries run for hours, so URLs frozen at enqueue would be dead on arrival) and ``urls`` (built
  from ``public_base_url``, which the transaction does not know). Every attempt's body is therefore
  signed on its own; the ``webhook-id`` stays the same.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.jobs.repository import JobRow
from comfyfleet.jobs.schemas import job_body
from comfyfleet.jobs.states import JobStatus
from comfyfleet.timeutil import isoformat, utcnow
from comfyfleet.webhooks import repository as repo

JOB_STARTED = "job.started"
TERMINAL_EVENTS: dict[str, str] = {
    JobStatus.SUCCEEDED: "job.succeeded",
    JobStatus.FAILED: "job.failed",
    JobStatus.CANCELED: "job.canceled",
    JobStatus.EXPIRED: "job.expired",
}
EVENT_TYPES: tuple[str, ...] = (*TERMINAL_EVENTS.values(), JOB_STARTED)
DEFAULT_EVENTS: tuple[str, ...] = tuple(TERMINAL_EVENTS.values())


def event_type_for(status: str) -> str | None:
    if status == JobStatus.RUNNING:
        return JOB_STARTED
    return TERMINAL_EVENTS.get(status)


def new_delivery_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def endpoint_target(endpoint_id: str) -> str:
    return f"endpoint:{endpoint_id}"


def job_url_target(tenant_id: str, url: str) -> str:
    # The URL itself may be long and carry tokens; the digest is enough to group attempts by it.
    return f"job_url:{tenant_id}:{hashlib.sha256(url.encode()).hexdigest()[:32]}"


def event_payload(job: JobRow, event_type: str) -> dict[str, Any]:
    """The event as of the transition. ``outputs`` and ``urls`` are placeholders the sender fills in."""
    when = job.completed_at if event_type != JOB_STARTED and job.completed_at else utcnow()
    data = job_body(job, base_url="", outputs=[], queue_position=None)
    return {"type": event_type, "timestamp": isoformat(when), "data": data}


async def enqueue_job_event(conn: AsyncConnection, job: JobRow) -> None:
    event_type = event_type_for(job.status)
    if event_type is None:
        return
    now = utcnow()
    payload = event_payload(job, event_type)
    common = {
        "tenant_id": job.tenant_id,
        "event_type": event_type,
        "job_id": job.id,
        "payload": payload,
        "status": repo.PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
    }
    rows: list[dict[str, Any]] = []
    for endpoint in await repo.enabled_endpoints(conn, job.tenant_id):
        if event_type in endpoint.events:
            rows.append(
                {
                    **common,
                    "id": new_delivery_id(),
                    "endpoint_id": endpoint.id,
                    "url": None,
                    "target": endpoint_target(endpoint.id),
                }
            )
    # The per-job URL hears about outcomes only; job.started is an endpoint opt-in.
    if job.webhook_url and event_type != JOB_STARTED:
        rows.append(
            {
                **common,
                "id": new_delivery_id(),
                "endpoint_id": None,
                "url": job.webhook_url,
                "target": job_url_target(job.tenant_id, job.webhook_url),
            }
        )
    await repo.insert_deliveries(conn, rows)
