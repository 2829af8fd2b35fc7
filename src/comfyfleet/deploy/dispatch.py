"""Dispatch on Modal: the API side of the ``modal`` dispatcher.

A pass (``dispatch_once``) does four things, each one conditional UPDATEs in ``jobs.repository``:

1. gives back jobs dispatched longer than ``dispatch_timeout_s`` ago and still unclaimed (the spawn
   was lost, or never started), and cancels their old call so it does not wait in Modal's queue;
2. reserves queued jobs for dispatch, fairest tenant first (``claimable_tenants``), inside each
   tenant's ``max_running`` (a dispatched job counts as active) and the fleet's ``inflight_cap``, each
   under a fresh ``dispatch_ref``;
3. spawns ``Worker.run_job(job_id, dispatch_ref)`` for each and stores the call id; a spawn that fails
   is given back and tried again by a later pass;
4. backs up cancel: a job still ``canceling`` ``cancel_grace_s`` after the request, whose worker did
   not interrupt it, gets ``FunctionCall.cancel()`` once.

A job never runs on two containers: the container takes the job with ``claim_dispatched``, which
matches only the ref of the latest dispatch while the job is still queued. A duplicate, delayed or
stale spawn finds nothing and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.aio import first_completed
from comfyfleet.jobs import repository as repo
from comfyfleet.queue.bus import NEW_WORK
from comfyfleet.runtime import Runtime
from comfyfleet.timeutil import utcnow

log = logging.getLogger(__name__)

# The names the API spawns by; modal_app.py defines the class and method under these names.
WORKER_CLASS = "Worker"
RUN_METHOD = "run_job"

MAX_BACKOFF_S = 30.0


class Spawner(Protocol):
    """What dispatch needs from Modal (or from a test's stand-in)."""

    async def spawn(self, job_id: str, dispatch_ref: str) -> str:
        """Start ``run_job(job_id, dispatch_ref)`` somewhere; returns the call id."""
        ...

    async def cancel(self, call_id: str) -> None: ...


class ModalSpawner:
    """``Spawner`` over the deployed app: ``Cls.from_name(...)().run_job.spawn``. ``modal`` is imported
    on first use, so the API imports without it."""

    def __init__(self, app_name: str, *, class_name: str = WORKER_CLASS, method: str = RUN_METHOD) -> None:
        self._app_name = app_name
        self._class_name = class_name
        self._method_name = method
        self._method: Any = None

    def _run_method(self) -> Any:
        if self._method is None:
            import modal

            # Lazy reference: hydrated on the first spawn, no network here.
            worker_cls = modal.Cls.from_name(self._app_name, self._class_name)
            self._method = getattr(worker_cls(), self._method_name)
        return self._method

    async def spawn(self, job_id: str, dispatch_ref: str) -> str:
        call = await self._run_method().spawn.aio(job_id, dispatch_ref)
        return str(call.object_id)

    async def cancel(self, call_id: str) -> None:
        import modal

        # from_id is a lazy constructor (not awaited); cancel() ends the input even when it runs.
        await modal.FunctionCall.from_id(call_id).cancel.aio()


@dataclass
class DispatchReport:
    dispatched: list[str] = field(default_factory=list)
    spawn_failed: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)
    cancels_sent: list[str] = field(default_factory=list)
    skipped_locked: bool = False


async def dispatch_once(runtime: Runtime, spawner: Spawner, now: datetime | None = None) -> DispatchReport:
    """One pass: give back stale dispatches, dispatch what fits, back up overdue cancels."""
    now = now or utcnow()
    report = DispatchReport()
    await _release_stale(runtime, spawner, now, report)
    picked = await _reserve(runtime, now, report)
    await _spawn_all(runtime, spawner, picked, report)
    await _cancel_backstop(runtime, spawner, now, report)
    return report


async def _release_stale(runtime: Runtime, spawner: Spawner, now: datetime, report: DispatchReport) -> None:
    cutoff = now - timedelta(seconds=runtime.settings.modal.dispatch_timeout_s)
    old_calls: list[str] = []
    async with runtime.engine.begin() as conn:
        for job_id, ref, call_id in await repo.stale_dispatch_calls(conn, older_than=cutoff):
            # Conditional on the ref: a container that claimed meanwhile keeps its job.
            if await repo.clear_dispatch(conn, job_id, ref=ref):
                report.redispatched.append(job_id)
                if call_id is not None:
                    old_calls.append(call_id)
    for call_id in old_calls:
        # Only tidies Modal's queue: the old call can no longer claim anything.
        with contextlib.suppress(Exception):
            await spawner.cancel(call_id)
    if report.redispatched:
        log.warning("dispatch: %d spawn(s) never claimed; dispatching again", len(report.redispatched))


async def _reserve(runtime: Runtime, now: datetime, report: DispatchReport) -> list[tuple[str, str]]:
    """Mark jobs dispatched in one transaction; the spawns happen after it commits."""
    settings = runtime.settings
    picked: list[tuple[str, str]] = []
    async with runtime.engine.begin() as conn:
        if not await repo.try_dispatch_lock(conn):
            report.skipped_locked = True  # another API container is dispatching right now
            return picked
        room = settings.modal.inflight_cap - await repo.dispatched_count(conn)
        while len(picked) < room:
            job_id = await _next_fair_job(conn, runtime, now)
            if job_id is None:
                break
            ref = uuid.uuid4().hex
            if await repo.mark_dispatched(conn, job_id, ref=ref, now=now):
                picked.append((job_id, ref))
    return picked


async def _next_fair_job(conn: AsyncConnection, runtime: Runtime, now: datetime) -> str | None:
    # Re-ranked after every pick: the tenant that just got a job has one more active and may yield.
    for tenant_id, max_running in await repo.claimable_tenants(conn, runtime.settings.plans, now=now):
        if not await repo.lock_tenant(conn, tenant_id):
            continue
        if await repo.count_active(conn, tenant_id) >= max_running:
            continue
        job_id = await repo.next_queued_id(conn, tenant_id, now=now)
        if job_id is not None:
            return job_id
    return None


async def _spawn_all(
    runtime: Runtime, spawner: Spawner, picked: list[tuple[str, str]], report: DispatchReport
) -> None:
    if not picked:
        return
    spawns = [spawner.spawn(job_id, ref) for job_id, ref in picked]
    results = await asyncio.gather(*spawns, return_exceptions=True)
    async with runtime.engine.begin() as conn:
        for (job_id, ref), result in zip(picked, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("dispatch: spawn of job %s failed (%s); back to the queue", job_id, result)
                # If the spawn did reach Modal after all, its call finds the ref cleared and returns.
                await repo.clear_dispatch(conn, job_id, ref=ref)
                report.spawn_failed.append(job_id)
            else:
                await repo.set_call_id(conn, job_id, ref=ref, call_id=result)
                report.dispatched.append(job_id)


async def _cancel_backstop(runtime: Runtime, spawner: Spawner, now: datetime, report: DispatchReport) -> None:
    cutoff = now - timedelta(seconds=runtime.settings.modal.cancel_grace_s)
    taken: list[tuple[str, str]] = []
    async with runtime.engine.begin() as conn:
        for job_id, call_id in await repo.canceling_with_calls(conn, requested_before=cutoff):
            if await repo.take_call_for_cancel(conn, job_id, call_id=call_id):
                taken.append((job_id, call_id))
    for job_id, call_id in taken:
        try:
            await spawner.cancel(call_id)
        except Exception as exc:
            log.warning("dispatch: FunctionCall.cancel(%s) for job %s failed: %s", call_id, job_id, exc)
            async with runtime.engine.begin() as conn:
                await repo.restore_call_id(conn, job_id, call_id=call_id)
            continue
        # The container's input is cancelled; its lease lapses and the reaper ends the job canceled.
        log.warning(
            "dispatch: job %s ignored its cancel for %gs; cancelled Modal call %s",
            job_id,
            runtime.settings.modal.cancel_grace_s,
            call_id,
        )
        report.cancels_sent.append(job_id)


def spawner_for(runtime: Runtime) -> Spawner:
    """The spawner a runtime was given (tests), else the deployed Modal app's."""
    provided = runtime.extras.get("spawner")
    if provided is not None:
        return cast(Spawner, provided)
    return ModalSpawner(runtime.settings.modal.app_name)


async def run_modal_dispatcher(runtime: Runtime, stop: asyncio.Event) -> None:
    """Dispatch passes until ``stop``: at once on new work, else every ``dispatch_interval_s``; after a
    failed spawn, with a growing pause (Modal may be unreachable)."""
    spawner = spawner_for(runtime)
    interval = runtime.settings.modal.dispatch_interval_s
    pause = interval
    async with runtime.bus.subscribe(NEW_WORK) as wakeups:
        while not stop.is_set():
            try:
                report = await dispatch_once(runtime, spawner)
                failed = bool(report.spawn_failed)
            except Exception:  # keep dispatching; one bad pass must not stop the loop
                log.exception("dispatch pass failed")
                failed = True
            pause = min(MAX_BACKOFF_S, pause * 2) if failed else interval
            if failed:
                await _wait(stop.wait(), pause)
            else:
                await _wait(first_completed(stop.wait(), wakeups.get(pause)), pause)


async def run_housekeeping(runtime: Runtime, duration_s: float) -> None:
    """What the scheduled Modal function runs for ``duration_s``: reaper, dispatcher and webhook sender.

    The API container runs the reaper and the dispatcher too, but only while it serves requests; this
    keeps jobs moving (leases, deadlines, dispatch, webhooks) when no client is polling. Two runs that
    overlap are harmless: jobs move by conditional UPDATEs and outbox attempts are claimed by lease.
    """
    from comfyfleet.queue.reaper import run_reaper
    from comfyfleet.webhooks.sender import run_sender

    stop = asyncio.Event()
    loops = [run_reaper(runtime, stop), run_modal_dispatcher(runtime, stop), run_sender(runtime, stop)]
    tasks = [asyncio.ensure_future(loop) for loop in loops]
    try:
        await _wait(stop.wait(), duration_s)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait(awaitable: Any, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(awaitable, timeout)
