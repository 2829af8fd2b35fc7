"""The ``/api/jobs`` view over queue and history (comfy_execution/jobs.py, as recorded)."""

from __future__ import annotations

from typing import Any

from .prompt_queue import PromptQueue, QueueItem

STATUSES = ("pending", "in_progress", "completed", "failed")
_TERMINAL = ("execution_success", "execution_error", "execution_interrupted")


class JobsQueryError(ValueError):
    """A bad query parameter: answered with 400 ``{"error": str(exc)}``."""


def _workflow_id(extra_data: dict[str, Any]) -> str | None:
    pnginfo = extra_data.get("extra_pnginfo")
    if isinstance(pnginfo, dict) and isinstance(pnginfo.get("workflow"), dict):
        workflow_id = pnginfo["workflow"].get("id")
        return str(workflow_id) if workflow_id is not None else None
    return None


def _queued(item: QueueItem, status: str) -> dict[str, Any]:
    job: dict[str, Any] = {
        "id": item.prompt_id,
        "status": status,
        "priority": item.number,
        "create_time": item.extra_data.get("create_time"),
        "outputs_count": 0,
    }
    workflow_id = _workflow_id(item.extra_data)
    if workflow_id is not None:
        job["workflow_id"] = workflow_id
    return job


def _output_items(outputs: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    items: list[tuple[str, str, dict[str, Any]]] = []
    for node_id, ui in outputs.items():
        for media, entries in ui.items():
            if isinstance(entries, list):
                items.extend((node_id, media, e) for e in entries if isinstance(e, dict))
    return items


def _finished(prompt_id: str, entry: dict[str, Any], *, full: bool) -> dict[str, Any]:
    number, _pid, prompt, extra_data, _outputs = entry["prompt"]
    status = entry.get("status") or {}
    messages = {name: data for name, data in status.get("messages", [])}
    end: dict[str, Any] = next((messages[name] for name in _TERMINAL if name in messages), {})
    job: dict[str, Any] = {
        "id": prompt_id,
        "status": "completed" if status.get("status_str") == "success" else "failed",
        "priority": number,
        "create_time": extra_data.get("create_time"),
        "execution_start_time": messages.get("execution_start", {}).get("timestamp"),
        "execution_end_time": end.get("timestamp"),
    }
    if "execution_error" in messages:
        job["execution_error"] = messages["execution_error"]
    items = _output_items(entry.get("outputs", {}))
    job["outputs_count"] = len(items)
    # The preview prefers a saved output over a temp preview (transcript 16).
    preferred = [i for i in items if i[2].get("type") == "output"] or items
    if preferred:
        node_id, media, item = preferred[0]
        job["preview_output"] = {**item, "nodeId": node_id, "mediaType": media}
    workflow_id = _workflow_id(extra_data)
    if workflow_id is not None:
        job["workflow_id"] = workflow_id
    if full:
        job["outputs"] = entry.get("outputs", {})
        job["execution_status"] = status
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def get_job(queue: PromptQueue, prompt_id: str) -> dict[str, Any] | None:
    for item in queue.running.values():
        if item.prompt_id == prompt_id:
            return _queued(item, "in_progress")
    for item in queue.pending:
        if item.prompt_id == prompt_id:
            return _queued(item, "pending")
    entry = queue.history.get(prompt_id)
    return _finished(prompt_id, entry, full=True) if entry is not None else None


def _int_param(query: dict[str, str], name: str, *, minimum: int, message: str) -> int | None:
    if name not in query:
        return None
    try:
        value = int(query[name])
    except ValueError:
        raise JobsQueryError(message) from None
    if value < minimum:
        raise JobsQueryError(message)
    return value


def list_jobs(queue: PromptQueue, query: dict[str, str]) -> dict[str, Any]:
    statuses = [s for s in query.get("status", "").split(",") if s] or list(STATUSES)
    bad = [s for s in statuses if s not in STATUSES]
    if bad:
        raise JobsQueryError(
            f"Invalid status value(s): {', '.join(bad)}. Valid values: {', '.join(STATUSES)}"
        )
    sort_by = query.get("sort_by", "created_at")
    if sort_by not in ("created_at", "execution_duration"):
        raise JobsQueryError("sort_by must be 'created_at' or 'execution_duration'")
    sort_order = query.get("sort_order", "desc")
    if sort_order not in ("asc", "desc"):
        raise JobsQueryError("sort_order must be 'asc' or 'desc'")
    limit = _int_param(query, "limit", minimum=1, message="limit must be a positive integer")
    offset = _int_param(query, "offset", minimum=0, message="offset must be a non-negative integer") or 0

    jobs = [_queued(item, "in_progress") for item in queue.running.values()]
    jobs += [_queued(item, "pending") for item in queue.pending]
    jobs += [_finished(pid, entry, full=False) for pid, entry in queue.history.items()]
    jobs = [j for j in jobs if j["status"] in statuses]
    if "workflow_id" in query:
        jobs = [j for j in jobs if j.get("workflow_id") == query["workflow_id"]]

    def duration(job: dict[str, Any]) -> int:
        start, end = job.get("execution_start_time"), job.get("execution_end_time")
        return end - start if start is not None and end is not None else 0

    def created(job: dict[str, Any]) -> int:
        return job.get("create_time") or 0

    jobs.sort(key=duration if sort_by == "execution_duration" else created, reverse=sort_order == "desc")
    page = jobs[offset:] if limit is None else jobs[offset : offset + limit]
    return {
        "jobs": page,
        "pagination": {
            "offset": offset,
            "limit": limit,
            "total": len(jobs),
            "has_more": offset + len(page) < len(jobs),
        },
    }
