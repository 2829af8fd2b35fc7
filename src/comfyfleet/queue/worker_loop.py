"""A worker loop: claim a job, run it with a ``JobExecutor`` while renewing its lease and watching
for cancel, finish it. The local dispatcher runs one loop per ComfyUI slot; a Modal container runs
``run_claimed`` for the job it was spawned with."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from comfyfleet.aio import first_completed
from comfyfleet.jobs import repository as repo
from comfyfleet.jobs.repository import JobRow
from comfyfleet.jobs.states import JobStatus
from comfyfleet.queue.bus import NEW_WORK, announce, job_topic
from comfyfleet.queue.claim import claim_next, finish
from comfyfleet.queue.executor import JobContext, JobExecutor, Outcome, Retry
from comfyfleet.runtime import Runtime
from comfyfleet.timeutil import utcnow

log = logging.getLogger(__name__)

IDLE_POLL_S = 1.0  # backstop when a wake-up notification is lost
UNAVAILABLE_POLL_S = 0.1  # how often a worker whose ComfyUI is down looks again


class WorkerLoop:
    def __init__(self, runtime: Runtime, executor: JobExecutor, *, name: str) -> None:
        self.runtime = runtime
        self.executor = executor
        self.name = name
        self.current: JobRow | None = None

    async def run(self, stop: asyncio.Event) -> None:
        # An executor may say it cannot take work now (its ComfyUI restarts); the protocol does not
        # require the method, so test executors need not have it.
        available = getattr(self.executor, "available", None)
        async with self.runtime.bus.subscribe(NEW_WORK) as wakeups:
            while not stop.is_set():
                if available is not None and not available():
                    await first_completed(stop.wait(), asyncio.sleep(UNAVAILABLE_POLL_S))
                    continue
                try:
                    job = await claim_next(self.runtime, self.name)
                except Exception:
                    log.exception("%s: claim failed", self.name)
                    job = None
                    await asyncio.sleep(IDLE_POLL_S)
                if job is None:
                    await first_completed(stop.wait(), wakeups.get(IDLE_POLL_S))
                    continue
                await run_claimed(self.runtime, self.executor, job, self.name)

    @property
    def busy(self) -> bool:
        return self.current is not None


async def run_claimed(runtime: Runtime, executor: JobExecutor, job: JobRow, worker: str) -> JobRow | None:
    """Run a job this worker holds, to exactly one final transition (or none if the lease was lost)."""
    full: JobRow | None = job
    if not job.workflow:  # the claim returns the whole row; read it only when given less
        async with runtime.engine.connect() as conn:
            full = await repo.get_job_for_worker(conn, job.id)
    if full is None:
        return None
    ctx = JobContext(job=full, worker=worker)
    progress = _ProgressWriter(runtime, ctx)
    ctx.report_progress = progress
    ctx.publish = _publisher(runtime, job.id)
    async with runtime.bus.subscribe(job_topic(job.id)) as events:
        watcher = asyncio.create_task(_watch(runtime, ctx, events))
        try:
            outcome: Outcome = await executor.execute(ctx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an executor bug must not leave the job running until its lease ends
            log.exception("%s: executor raised on job %s", worker, job.id)
            outcome = Retry(f"worker error: {type(exc).__name__}")
        finally:
            last_progress = await progress.close()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    if ctx.lease_lost.is_set():
        return None
    return await finish(runtime, full, worker, outcome, progress=last_progress)


async def _watch(runtime: Runtime, ctx: JobContext, events: Any) -> None:
    """Renew the lease and notice cancel: pushed through the bus, or seen at the next lease renewal or
    status poll, whichever comes first."""
    settings = runtime.settings
    next_heartbeat = time.monotonic() + settings.heartbeat_s
    next_poll = time.monotonic() + settings.cancel_poll_s
    while True:
        now = time.monotonic()
        wait = max(0.0, min(next_heartbeat, next_poll) - now)
        message = await events.get(wait)
        if message is not None and message.get("status") == JobStatus.CANCELING:
            ctx.cancel_requested.set()
        now = time.monotonic()
        if now >= next_poll:
            next_poll = now + settings.cancel_poll_s
            async with runtime.reader.connect() as conn:  # a read: no SQLite write lock every poll
                status = await repo.read_status(conn, ctx.job.id)
            if status == JobStatus.CANCELING:
                ctx.cancel_requested.set()
        if now >= next_heartbeat:
            next_heartbeat = now + settings.heartbeat_s
            try:
                async with runtime.engine.begin() as conn:
                    status = await repo.renew_lease(
                        conn, ctx.job.id, worker=ctx.worker, lease_s=settings.lease_s, now=utcnow()
                    )
            except Exception:  # a missed heartbeat is retried; the lease has slack
                log.exception("heartbeat failed for job %s", ctx.job.id)
                continue
            if status is None:
                log.warning("lost the lease on job %s", ctx.job.id)
                ctx.lease_lost.set()
                ctx.cancel_requested.set()
                return
            if status == JobStatus.CANCELING:
                ctx.cancel_requested.set()


class _ProgressWriter:
    """Progress goes to the database and the bus at most every ``progress_interval_s``, counted from
    the start of the job. A snapshot that comes sooner is kept, and the newest kept one is written
    when the interval has passed, so a burst followed by a long quiet node still shows that node.
    What is still kept when the job ends (its last snapshot) goes into the finishing transition
    (``close``), so a short job costs no progress write of its own and its final status and final
    progress become visible together."""

    def __init__(self, runtime: Runtime, ctx: JobContext) -> None:
        self.runtime = runtime
        self.ctx = ctx
        self.interval = runtime.settings.progress_interval_s
        self.last_write = time.monotonic()
        self.pending: dict[str, Any] | None = None
        self.last_written: dict[str, Any] | None = None
        self.flusher: asyncio.Task[None] | None = None
        self.flusher_sleeping = False
        self.closing = False
        self.lock = asyncio.Lock()  # writes go out one at a time, in order

    async def __call__(self, progress: dict[str, Any]) -> None:
        if progress == self.last_written and self.pending is None:
            return  # ComfyUI repeats itself (a prompt's last events all read "complete")
        if self.flusher is not None and not self.flusher.done():
            self.pending = progress  # the flusher writes the newest snapshot when its time comes
            return
        now = time.monotonic()
        if now - self.last_write >= self.interval:
            await self._write(progress)
            return
        self.pending = progress
        self.flusher = asyncio.create_task(self._flush_after(self.last_write + self.interval - now))

    async def _flush_after(self, delay: float) -> None:
        while True:
            self.flusher_sleeping = True
            try:
                await asyncio.sleep(delay)
            finally:
                self.flusher_sleeping = False
            await self._write(None)
            if self.pending is None or self.closing:
                return
            delay = self.interval  # newer snapshots came while it wrote

    async def _write(self, progress: dict[str, Any] | None) -> None:
        async with self.lock:
            if progress is None:  # the flusher: take the newest pending snapshot under the lock
                progress, self.pending = self.pending, None
                if progress is None:
                    return
            if progress == self.last_written:
                return
            self.last_write, self.last_written = time.monotonic(), progress
            async with self.runtime.engine.begin() as conn:
                await repo.set_progress(conn, self.ctx.job.id, worker=self.ctx.worker, progress=progress)
            announce(self.runtime.bus, job_topic(self.ctx.job.id), {"kind": "progress", "progress": progress})

    async def close(self) -> dict[str, Any] | None:
        """Stop, and answer with the snapshot not written yet, for the finishing transition. A
        flusher still sleeping is cancelled; one already writing is awaited rather than cancelled
        inside its transaction."""
        self.closing = True
        task = self.flusher
        if task is not None and not task.done():
            if self.flusher_sleeping:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        final, self.pending = self.pending, None
        return final if final != self.last_written else None


def _publisher(runtime: Runtime, job_id: str) -> Any:
    async def publish(kind: str, payload: dict[str, Any]) -> None:
        announce(runtime.bus, job_topic(job_id), {"kind": kind, **payload})

    return publish
