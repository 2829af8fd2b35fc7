"""Dispatch on Modal, end to end in-process: the real dispatcher (``dispatch_once``) against a stand-in
of Modal's spawn/cancel that behaves like Modal (calls can be duplicated, held back, or fail; a
cancel can land late), and the real container path (``ContainerWorker.run_job``: ``claim_dispatched``
+ ``run_claimed``) on several stand-in containers. No job is lost, none runs twice, cancel ends in
canceled, failed spawns are retried, quotas and the in-flight cap hold."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from comfyfleet.config import Settings
from comfyfleet.deploy.dispatch import dispatch_once, run_housekeeping, run_modal_dispatcher
from comfyfleet.deploy.modal_worker import ContainerWorker, HealthMonitor, SlotProbe
from comfyfleet.jobs import repository as repo
from comfyfleet.jobs.states import TERMINAL, JobStatus
from comfyfleet.queue.executor import JobContext, JobExecutor, Outcome, Succeeded
from comfyfleet.queue.reaper import reap_once
from comfyfleet.runtime import Runtime
from comfyfleet.timeutil import utcnow
from tests.conftest import make_settings
from tests.support.executors import ScriptedExecutor
from tests.support.factories import TenantWithKey, make_tenant
from tests.support.workflows import empty_image_save

DISPATCH_TIMEOUT_S = 60.0
CANCEL_GRACE_S = 5.0
INFLIGHT_CAP = 8


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return make_settings(
        db_url,
        tmp_path / "data",
        dispatch="modal",
        modal={
            "inflight_cap": INFLIGHT_CAP,
            "dispatch_timeout_s": DISPATCH_TIMEOUT_S,
            "cancel_grace_s": CANCEL_GRACE_S,
            "dispatch_interval_s": 0.05,
        },
    )


# ------------------------------------------------------------------------------ stand-ins


class Ledger:
    """Every execution of every job, across all containers: who ran what, and whether two ran at once."""

    def __init__(self) -> None:
        self.running: dict[str, str] = {}
        self.executions: Counter[str] = Counter()
        self.overlaps: list[str] = []
        self.peak = 0

    def start(self, job_id: str, worker: str) -> None:
        if job_id in self.running:
            self.overlaps.append(f"{job_id} on {self.running[job_id]} and {worker}")
        self.running[job_id] = worker
        self.executions[job_id] += 1
        self.peak = max(self.peak, len(self.running))

    def end(self, job_id: str, worker: str) -> None:
        if self.running.get(job_id) == worker:
            del self.running[job_id]


@dataclass
class Recorded:
    """A slot's executor that writes every execution into the ledger."""

    inner: JobExecutor
    ledger: Ledger

    async def execute(self, ctx: JobContext) -> Outcome:
        self.ledger.start(ctx.job.id, ctx.worker)
        try:
            return await self.inner.execute(ctx)
        finally:
            self.ledger.end(ctx.job.id, ctx.worker)


class Stubborn:
    """A ComfyUI that ignores interrupts: the job only ends when its task is cancelled."""

    def __init__(self) -> None:
        self.started: asyncio.Queue[str] = asyncio.Queue()

    async def execute(self, ctx: JobContext) -> Outcome:
        await self.started.put(ctx.job.id)
        await asyncio.Event().wait()  # never looks at ctx.cancel_requested
        return Succeeded()


@dataclass
class Call:
    call_id: str
    job_id: str
    ref: str
    gate: asyncio.Event
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    results: list[str] = field(default_factory=list)


class StandInModal:
    """Spawn/cancel like Modal's: a spawn becomes an input that runs ``run_job`` on one of the
    containers. Knobs: ``fail_next`` spawns raise; ``duplicate`` delivers each input twice (to two
    containers); ``hold`` keeps new inputs queued until ``release``; ``late_cancels`` keeps cancels
    pending until ``land_cancels``."""

    def __init__(self, containers: Sequence[ContainerWorker]) -> None:
        self.containers = list(containers)
        self.calls: dict[str, Call] = {}
        self.fail_next = 0
        self.duplicate = False
        self.hold = False
        self.late_cancels = False
        self.cancel_requests: list[str] = []
        self._pending_cancels: list[str] = []
        self._next = itertools.count()
        self._rotation = itertools.cycle(range(len(self.containers)))

    async def spawn(self, job_id: str, dispatch_ref: str) -> str:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("Modal is unreachable")
        call = Call(f"fc-{next(self._next)}", job_id, dispatch_ref, asyncio.Event())
        if not self.hold:
            call.gate.set()
        start = next(self._rotation)
        for copy in range(2 if self.duplicate else 1):
            container = self.containers[(start + copy) % len(self.containers)]
            call.tasks.append(asyncio.ensure_future(self._deliver(call, container)))
        self.calls[call.call_id] = call
        return call.call_id

    async def _deliver(self, call: Call, container: ContainerWorker) -> None:
        try:
            await call.gate.wait()
            call.results.append(await container.run_job(call.job_id, call.ref))
        except asyncio.CancelledError:
            call.results.append("cancelled")

    async def cancel(self, call_id: str) -> None:
        self.cancel_requests.append(call_id)
        if self.late_cancels:
            self._pending_cancels.append(call_id)
        else:
            self._apply_cancel(call_id)

    def _apply_cancel(self, call_id: str) -> None:
        for task in self.calls[call_id].tasks:
            task.cancel()

    def land_cancels(self) -> None:
        pending, self._pending_cancels = self._pending_cancels, []
        for call_id in pending:
            self._apply_cancel(call_id)

    def release(self, *call_ids: str) -> None:
        for call_id in call_ids or tuple(self.calls):
            self.calls[call_id].gate.set()

    def calls_for(self, job_id: str) -> list[Call]:
        return [call for call in self.calls.values() if call.job_id == job_id]

    async def settle(self) -> None:
        """Wait for every input that is free to run to end."""
        tasks = [t for call in self.calls.values() if call.gate.is_set() for t in call.tasks]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        for call in self.calls.values():
            for task in call.tasks:
                task.cancel()
        await asyncio.gather(*(t for c in self.calls.values() for t in c.tasks), return_exceptions=True)


@dataclass
class Fleet:
    modal: StandInModal
    containers: list[ContainerWorker]
    ledger: Ledger
    resets: list[tuple[str, int]]


def make_fleet(
    runtime: Runtime,
    executor: JobExecutor,
    *,
    containers: int = 2,
    slots: int = 2,
    health: Callable[[int], HealthMonitor | None] = lambda _index: None,
) -> Fleet:
    ledger, resets = Ledger(), []
    workers: list[ContainerWorker] = []
    for index in range(containers):
        name = f"c{index}"

        async def reset(slot: int, name: str = name) -> None:
            resets.append((name, slot))

        workers.append(
            ContainerWorker(
                runtime,
                [Recorded(executor, ledger) for _ in range(slots)],
                name=name,
                health=health(index),
                reset_slot=reset,
            )
        )
    return Fleet(StandInModal(workers), workers, ledger, resets)


@pytest.fixture
async def fleets() -> AsyncIterator[list[Fleet]]:
    """Fleets a test makes; their stand-in inputs are stopped at the end."""
    created: list[Fleet] = []
    yield created
    for fleet in created:
        await fleet.modal.close()


# --------------------------------------------------------------------------------- helpers


async def submit(api: httpx.AsyncClient, tenant: TenantWithKey, n: int) -> list[str]:
    ids = []
    for i in range(n):
        response = await api.post(
            "/api/v2/jobs", json={"workflow": empty_image_save(color=i)}, headers=tenant.headers
        )
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


async def job(runtime: Runtime, job_id: str) -> repo.JobRow:
    async with runtime.engine.connect() as conn:
        row = await repo.get_job_for_worker(conn, job_id)
    assert row is not None
    return row


async def statuses(runtime: Runtime, job_ids: Sequence[str]) -> dict[str, str]:
    return {job_id: (await job(runtime, job_id)).status for job_id in job_ids}


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll a condition (the worker notices cancels by polling too); a bound only against hanging."""
    for _ in range(400):
        if await condition():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"never happened: {what}")


async def run_until_done(
    runtime: Runtime, fleet: Fleet, job_ids: Sequence[str], *, limits: dict[str, int] | None = None
) -> None:
    """Dispatch passes until every job is terminal (the API's dispatcher loop, step by step),
    checking the in-flight cap and the tenants' ``max_running`` after every pass."""
    for _ in range(40):
        await dispatch_once(runtime, fleet.modal)
        async with runtime.engine.connect() as conn:
            assert await repo.dispatched_count(conn) <= runtime.settings.modal.inflight_cap
            for tenant_id, max_running in (limits or {}).items():
                assert await repo.count_active(conn, tenant_id) <= max_running
        await fleet.modal.settle()
        if all(status in TERMINAL for status in (await statuses(runtime, job_ids)).values()):
            return
    raise AssertionError(f"jobs not finished: {await statuses(runtime, job_ids)}")


# ----------------------------------------------------------------------------------- tests


async def test_duplicated_spawns_run_every_job_exactly_once(
    api: httpx.AsyncClient, runtime: Runtime, fleets: list[Fleet]
) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings, plan="enterprise")
    job_ids = await submit(api, tenant, 8)
    fleet = make_fleet(runtime, ScriptedExecutor(default=Succeeded()), containers=3)
    fleets.append(fleet)
    fleet.modal.duplicate = True  # every input is delivered to two containers
    await run_until_done(runtime, fleet, job_ids)
    assert set((await statuses(runtime, job_ids)).values()) == {JobStatus.SUCCEEDED}
    assert fleet.ledger.executions == Counter({job_id: 1 for job_id in job_ids})
    assert fleet.ledger.overlaps == []
    results = Counter(result for call in fleet.modal.calls.values() for result in call.results)
    assert results == {"succeeded": 8, "not_claimed": 8}  # each duplicate found nothing to run


async def test_two_containers_given_the_same_job_never_both_run_it(
    api: httpx.AsyncClient, runtime: Runtime, fleets: list[Fleet]
) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    (job_id,) = await submit(api, tenant, 1)
    executor = ScriptedExecutor()
    fleet = make_fleet(runtime, executor)
    fleets.append(fleet)
    fleet.modal.hold = True
    await dispatch_once(runtime, fleet.modal)
    ref = (await job(runtime, job_id)).dispatch_ref
    assert ref is not None
    # The same input on both containers at the same moment: the conditional claim lets one through.
    first, second = fleet.containers
    runs = [asyncio.ensure_future(c.run_job(job_id, ref)) for c in (first, second)]
    started = await executor.started.get()
    done, _ = await asyncio.wait(runs, return_when=asyncio.FIRST_COMPLETED)
    assert [task.result() for task in done] == ["not_claimed"]
    executor.finish(started.job.id)
    assert sorted(await asyncio.gather(*runs)) == ["not_claimed", "succeeded"]
    assert fleet.ledger.executions[job_id] == 1
    # And a late copy of the spawn, after the job ended, finds nothing either.
    assert await second.run_job(job_id, ref) == "not_claimed"


async def test_a_failed_spawn_is_given_back_and_retried(
    api: httpx.AsyncClient, runtime: Runtime, fleets: list[Fleet]
) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings, plan="enterprise")
    job_ids = await submit(api, tenant, 3)
    fleet = make_fleet(runtime, ScriptedExecutor(default=Succeeded()))
    fleets.append(fleet)
    fleet.modal.fail_next = 3
    report = await dispatch_once(runtime, fleet.modal)
    assert sorted(report.spawn_failed) == sorted(job_ids) and report.dispatched == []
    for row in [await job(runtime, job_id) for job_id in job_ids]:
        assert row.status == JobStatus.QUEUED and row.dispatched_at is None and row.dispatch_ref is None
    await run_until_done(runtime, fleet, job_ids)
    assert set((await statuses(runtime, job_ids)).values()) == {JobStatus.SUCCEEDED}
    assert fleet.ledger.executions == Counter({job_id: 1 for job_id in job_ids})


async def test_a_spawn_never_claimed_is_dispatched_again_and_the_late_one_finds_nothing(
    api: httpx.AsyncClient, runtime: Runtime, fleets: list[Fleet]
) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    (job_id,) = await submit(api, tenant, 1)
    fleet = make_fleet(runtime, ScriptedExecutor(default=Succeeded()))
    fleets.append(fleet)
    fleet.modal.hold = True  # the first input is stuck in Modal's queue
    fleet.modal.late_cancels = True  # and the cancel of it arrives only after everything else
    await dispatch_once(runtime, fleet.modal)
    (lost,) = fleet.modal.calls_for(job_id)
    assert (await job(runtime, job_id)).dispatch_call_id == lost.call_id

    fleet.modal.hold = False
    later = utcnow() + timedelta(seconds=DISPATCH_TIMEOUT_S + 1)
    report = await dispatch_once(runtime, fleet.modal, now=later)
    assert report.redispatched == [job_id] and report.dispatched == [job_id]
    assert fleet.modal.cancel_requests == [lost.call_id]  # the stuck input is withdrawn
    await fleet.modal.settle()
    assert (await job(runtime, job_id)).status == JobStatus.SUCCEEDED

    fleet.modal.release(lost.call_id)  # the stuck input is delivered after all
    await fleet.modal.settle()
    fleet.modal.land_cancels()
    assert lost.results == ["not_claimed"]
    assert fleet.ledger.executions[job_id] == 1


async def test_quotas_and_the_inflight_cap_bound_dispatch(
    api: httpx.AsyncClient, runtime: Runtime, fleets: list[Fleet]
) -> None:
    pros = [await make_tenant(runtime.engine, runtime.settings, plan="pro") for _ in range(3)]  # max 4
    free = await make_tenant(runtime.engine, runtime.settings, plan="free")  # max 1, lowest priority
    job_ids = [job_id for tenant in pros for job_id in await submit(api, tenant, 4)]
    job_ids += await submit(api, free, 2)
    limits = {tenant.id: 4 for tenant in pros} | {free.id: 1}
    fleet = make_fleet(runtime, ScriptedExecutor(default=Succeeded()), containers=4, slots=4)
    fleets.append(fleet)
    fleet.modal.hold = True
    report = await dispatch_once(runtime, fleet.modal)
    per_tenant = Counter([(await job(runtime, job_id)).tenant_id for job_id in report.dispatched])
    # The cap bounds the fleet; inside it the three pro tenants share fairly (3, 3, 2).
    assert sum(per_tenant.values()) == INFLIGHT_CAP
    assert sorted(per_tenant.values()) == [2, 3, 3] and free.id not in per_tenant
    assert (await dispatch_once(runtime, fleet.modal)).dispatched == []  # full: nothing more
    async with runtime.engine.connect() as conn:
        assert await repo.dispatched_count(conn) == INFLIGHT_CAP

    fleet.modal.hold = False
    fleet.modal.release()
    await run_until_done(runtime, fleet, job_ids, limits=limits)
    assert set((await statuses(runtime, job_ids)).values()) == {JobStatus.SUCCEEDED}
    assert fleet.ledger.peak <= INFLIGHT_CAP and fleet.ledger.overlaps == []


async def test_dispatchers_of_several_api_containers_share_the_cap(
    api: httpx.AsyncClient, runtime: Runtime, fleets: list[Fleet]
) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings, plan="enterprise")
    await submit(api, tenant, INFLIGHT_CAP + 4)
    fleet = make_fleet(runtime, ScriptedExecutor(default=Succeeded()))
    fleets.append(fleet)
    fleet.modal.hold = True
    reports = await asyncio.gather(*(dispatch_once(runtime, fleet.modal) for _ in range(4)))
    assert sum(len(report.dispatched) for report in reports) == INFLIGHT_CAP
    async with runtime.engine.connect() as conn:
        assert await repo.dispatched_count(conn) == INFLIGHT_CAP


async def test_cancel_reaches_a_cooperative_worker_without_the_backstop(
    api: httpx.AsyncClient, runtime: Runtime, fleets: list[Fleet]
) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    (job_id,) = await submit(api, tenant, 1)
    executor = ScriptedExecutor()
    fleet = make_fleet(runtime, executor)
    fleets.append(fleet)
    await dispatch_once(runtime, fleet.modal)
    await executor.started.get()
    response = await api.post(f"/api/v2/jobs/{job_id}/cancel", headers=tenant.headers)
    assert response.json()["status"] == "canceling"

    async def canceled() -> bool:
        return (await job(runtime, job_id)).status == JobStatus.CANCELED

    await wait_for(canceled, "the worker ends the job canceled")
    assert executor.seen_cancel == [job_id]
    report = await dispatch_once(runtime, fleet.modal, now=utcnow() + timedelta(seconds=CANCEL_GRACE_S + 1))
    assert report.cancels_sent == [] and fleet.modal.cancel_requests == []


async def test_the_backstop_cancels_a_call_whose_worker_ignores_the_cancel(
    api: httpx.AsyncClient, runtime: Runtime, fleets: list[Fleet]
) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    (job_id,) = await submit(api, tenant, 1)
    executor = Stubborn()
    fleet = make_fleet(runtime, executor)
    fleets.append(fleet)
    fleet.modal.late_cancels = True
    await dispatch_once(runtime, fleet.modal)
    assert await executor.started.get() == job_id
    await api.post(f"/api/v2/jobs/{job_id}/cancel", headers=tenant.headers)
    (call,) = fleet.modal.calls_for(job_id)

    # Inside the grace period nothing happens; after it, one FunctionCall.cancel(), once.
    assert (await dispatch_once(runtime, fleet.modal)).cancels_sent == []
    past_grace = utcnow() + timedelta(seconds=CANCEL_GRACE_S + 1)
    assert (await dispatch_once(runtime, fleet.modal, now=past_grace)).cancels_sent == [job_id]
    assert (await dispatch_once(runtime, fleet.modal, now=past_grace)).cancels_sent == []
    assert fleet.modal.cancel_requests == [call.call_id]

    fleet.modal.land_cancels()  # the cancel lands late; the input is stopped mid-prompt
    await fleet.modal.settle()
    assert call.results == ["cancelled"]
    assert (await job(runtime, job_id)).status == JobStatus.CANCELING
    # The container resets the slot whose prompt was abandoned before it takes another job.
    assert len(fleet.resets) == 1

    # No heartbeat any more: the lease lapses and the reaper ends the job canceled.
    lapsed = utcnow() + timedelta(seconds=runtime.settings.lease_s + 1)
    assert (await reap_once(runtime, now=lapsed)).canceled == [job_id]
    assert (await job(runtime, job_id)).status == JobStatus.CANCELED


async def test_a_sick_container_retries_its_job_elsewhere_and_gives_back_new_inputs(
    api: httpx.AsyncClient, runtime: Runtime, fleets: list[Fleet]
) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    (job_id,) = await submit(api, tenant, 1)
    executor = ScriptedExecutor()
    broken: list[bool] = [False]
    stopped: list[str] = []

    def health(index: int) -> HealthMonitor | None:
        if index != 0:
            return None

        async def probe() -> list[SlotProbe]:
            state = "failed" if broken[0] else "ready"
            return [SlotProbe(index=0, state=state, answers=not broken[0])]

        async def stop_fetching(reason: str) -> None:
            stopped.append(reason)

        return HealthMonitor(probe, stuck_prompt_s=600, memory_growth_limit_mib=None, on_sick=stop_fetching)

    fleet = make_fleet(runtime, executor, health=health)
    fleets.append(fleet)
    sick_one, healthy_one = fleet.containers
    await dispatch_once(runtime, fleet.modal)  # the first input goes to container 0
    ctx = await executor.started.get()
    assert ctx.worker.startswith("c0-")

    broken[0] = True
    assert sick_one.health is not None
    await sick_one.health.check()
    await fleet.modal.settle()
    row = await job(runtime, job_id)
    assert row.status == JobStatus.QUEUED and row.attempts == 1  # retried, not failed
    assert len(stopped) == 1  # stop_fetching_inputs, once

    # Inputs that still reach the sick container are given back at once, and run elsewhere.
    fleet.modal.hold = True
    await dispatch_once(runtime, fleet.modal)
    new_ref = (await job(runtime, job_id)).dispatch_ref
    assert new_ref is not None
    assert await sick_one.run_job(job_id, new_ref) == "given_back"
    assert (await job(runtime, job_id)).dispatched_at is None
    run = asyncio.ensure_future(_dispatch_to(runtime, fleet, healthy_one, job_id))
    second = await executor.started.get()
    assert second.worker.startswith("c1-")
    executor.finish(job_id)
    assert await run == "succeeded"
    assert fleet.ledger.overlaps == []


async def _dispatch_to(runtime: Runtime, fleet: Fleet, container: ContainerWorker, job_id: str) -> str:
    """Dispatch the job again and deliver that input to one chosen container."""
    await dispatch_once(runtime, fleet.modal)
    ref = (await job(runtime, job_id)).dispatch_ref
    assert ref is not None
    return await container.run_job(job_id, ref)


async def test_the_dispatcher_loop_runs_new_work_until_stopped(
    api: httpx.AsyncClient, runtime: Runtime, fleets: list[Fleet]
) -> None:
    fleet = make_fleet(runtime, ScriptedExecutor(default=Succeeded()))
    fleets.append(fleet)
    runtime.extras["spawner"] = fleet.modal
    stop = asyncio.Event()
    loop = asyncio.ensure_future(run_modal_dispatcher(runtime, stop))
    try:
        tenant = await make_tenant(runtime.engine, runtime.settings)
        job_ids = await submit(api, tenant, 3)

        async def all_succeeded() -> bool:
            return set((await statuses(runtime, job_ids)).values()) == {JobStatus.SUCCEEDED}

        await wait_for(all_succeeded, "the dispatcher loop runs the submitted jobs")
    finally:
        stop.set()
        await loop


async def test_housekeeping_runs_for_its_period_and_stops(runtime: Runtime, fleets: list[Fleet]) -> None:
    fleet = make_fleet(runtime, ScriptedExecutor(default=Succeeded()))
    fleets.append(fleet)
    runtime.extras["spawner"] = fleet.modal
    await run_housekeeping(runtime, 0.2)  # reaper, dispatcher and webhook sender start and stop cleanly
