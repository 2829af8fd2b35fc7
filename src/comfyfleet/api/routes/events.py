"""``GET /api/v2/jobs/{id}/events``: the contract's SSE stream.

The handler subscribes to the job's notifications *before* it reads the snapshot, and every event
it sends about status, progress and outputs comes from a fresh database read, so no event falls
between the snapshot and the stream and no stream shows a status the database did not hold.
Notifications only say "look again"; a one-second re-read backs them up. Previews come straight
from notifications (the newest one is kept in memory for new subscribers). The stream ends after
the terminal status."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from comfyfleet.api.deps import get_runtime
from comfyfleet.api.routes.jobs import JobsReader
from comfyfleet.assets import repository as asset_repo
from comfyfleet.assets.repository import AssetRow
from comfyfleet.assets.schemas import output_body
from comfyfleet.jobs import repository as job_repo
from comfyfleet.jobs import service
from comfyfleet.jobs.repository import JobRow
from comfyfleet.jobs.states import TERMINAL, JobStatus
from comfyfleet.queue.bus import job_topic
from comfyfleet.runtime import Runtime

router = APIRouter(prefix="/api/v2/jobs", tags=["jobs"])

RECHECK_S = 1.0
KEEPALIVE_S = 15.0


def sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


@router.get("/{job_id}/events")
async def job_events(job_id: str, request: Request, principal: JobsReader) -> StreamingResponse:
    runtime = get_runtime(request)
    async with runtime.reader.connect() as conn:
        await service.get_job(conn, principal.tenant_id, job_id)  # 404 before the stream starts
    stream = _stream(runtime, request, principal.tenant_id, job_id)
    return StreamingResponse(
        stream, media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(runtime: Runtime, request: Request, tenant_id: str, job_id: str) -> AsyncIterator[bytes]:
    previews: dict[str, dict[str, Any]] = runtime.extras.setdefault("latest_previews", {})
    async with runtime.bus.subscribe(job_topic(job_id)) as subscription:
        view = _JobView(runtime, tenant_id, job_id)
        first = True
        last_sent = time.monotonic()
        while True:
            job, chunks = await view.poll()
            if job is None:
                return
            for chunk in chunks:
                yield chunk
                last_sent = time.monotonic()
            if first:
                first = False
                preview = previews.get(job_id)
                if preview is not None and job.status not in TERMINAL:
                    yield sse("preview", preview)
            if job.status in TERMINAL:
                return
            message = await subscription.get(RECHECK_S)
            while message is not None:
                if message.get("kind") == "preview":
                    yield sse("preview", {k: message[k] for k in ("node_id", "content_type", "data_base64")})
                    last_sent = time.monotonic()
                message = subscription.queue.get_nowait() if not subscription.queue.empty() else None
            if await request.is_disconnected():
                return
            if time.monotonic() - last_sent > KEEPALIVE_S:
                yield b": keepalive\n\n"
                last_sent = time.monotonic()


class _JobView:
    """What this stream has told its client so far; ``changes`` answers with what is new."""

    def __init__(self, runtime: Runtime, tenant_id: str, job_id: str) -> None:
        self.runtime = runtime
        self.tenant_id = tenant_id
        self.job_id = job_id
        self.status: str | None = None
        self.queue_position: int | None = None
        self.progress: dict[str, Any] | None = None
        self.outputs: set[str] = set()

    async def poll(self) -> tuple[JobRow | None, list[bytes]]:
        """Read the job and its outputs on one read-only connection (one snapshot on SQLite, and
        no write lock taken per wake-up), and answer with what this stream has not sent yet."""
        async with self.runtime.reader.connect() as conn:
            job = await job_repo.get_job(conn, self.tenant_id, self.job_id)
            if job is None:
                return None, []
            position = None
            outputs: list[AssetRow] = []
            if job.status == JobStatus.QUEUED:
                position = job.queue_position
                if position is None:
                    position = await job_repo.queue_position(conn, job)
            else:
                outputs = await asset_repo.outputs_for_job(conn, self.tenant_id, self.job_id)
        return job, await self._changes(job, position, outputs)

    async def _changes(self, job: JobRow, position: int | None, outputs: list[AssetRow]) -> list[bytes]:
        chunks: list[bytes] = []
        terminal = job.status in TERMINAL
        if not terminal and (job.status != self.status or position != self.queue_position):
            chunks.append(sse("status", {"status": job.status, "queue_position": position}))
        if job.progress is not None and job.progress != self.progress:
            self.progress = job.progress
            chunks.append(sse("progress", job.progress))
        for asset in outputs:
            if asset.id not in self.outputs:
                self.outputs.add(asset.id)
                body = await output_body(asset, storage=self.runtime.storage,
                                         lifetime_s=self.runtime.settings.url_lifetime_s)
                chunks.append(sse("output", body))
        if terminal and job.status != self.status:
            # Outputs first, then the terminal status: a client that stops at it has them all.
            chunks.append(sse("status", {"status": job.status, "queue_position": None}))
        self.status, self.queue_position = job.status, position
        return chunks
