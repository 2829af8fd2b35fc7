"""Job bodies as the Comfy API v2 contract shapes them (validated against comfy-sdk's models in tests).
Built as plain dicts: this is the hot path of every poll."""

from __future__ import annotations

from typing import Any

from comfyfleet.jobs.repository import JobRow
from comfyfleet.jobs.states import JobStatus
from comfyfleet.timeutil import isoformat


def job_urls(base_url: str, job_id: str) -> dict[str, str]:
    root = f"{base_url}/api/v2/jobs/{job_id}"
    return {"self": root, "events": f"{root}/events", "cancel": f"{root}/cancel"}


def job_body(
    job: JobRow,
    *,
    base_url: str,
    outputs: list[dict[str, Any]],
    queue_position: int | None,
) -> dict[str, Any]:
    queue_ms = execution_ms = None
    if job.started_at is not None:
        queue_ms = int((job.started_at - job.created_at).total_seconds() * 1000)
        if job.completed_at is not None:
            execution_ms = int((job.completed_at - job.started_at).total_seconds() * 1000)
    return {
        "id": job.id,
        "status": job.status,
        "created_at": isoformat(job.created_at),
        "started_at": isoformat(job.started_at),
        "completed_at": isoformat(job.completed_at),
        "expires_at": isoformat(job.expires_at),
        "queue_position": queue_position if job.status == JobStatus.QUEUED else None,
        "progress": job.progress,
        "outputs": outputs,
        "error": job.error,
        "metrics": {"queue_ms": queue_ms, "execution_ms": execution_ms, "attempts": job.attempts},
        "metadata": job.labels or {},
        "urls": job_urls(base_url, job.id),
    }


def job_error(code: str, message: str, **fields: Any) -> dict[str, Any]:
    """The contract's JobError: code, message, node_id, class_type, traceback (+ our details)."""
    error: dict[str, Any] = {
        "code": code,
        "message": message,
        "node_id": None,
        "class_type": None,
        "traceback": None,
    }
    error.update({k: v for k, v in fields.items() if v is not None})
    return error
