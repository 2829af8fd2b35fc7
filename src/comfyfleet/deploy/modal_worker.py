"""The GPU container's side of Modal dispatch, kept apart from ``modal`` so tests run it in-process.

``ContainerWorker.run_job(job_id, dispatch_ref)`` is what ``Worker.run_job`` in ``modal_app.py`` does
for each input: take a free ComfyUI slot, claim the job with ``claim_dispatched`` (a stale or
duplicate spawn finds nothing and returns), run it with ``run_claimed`` on that slot's executor, and
end it with one transition.

Health (``HealthMonitor``): on a timer and before each job the container probes its ComfyUI slots
(``/system_stats``, the prompt each one runs, the process's memory). When one is sick the container
stops taking inputs (``modal.experimental.stop_fetching_inputs``), the jobs it runs end as ``Retry``
and run again on another container, and inputs that still arrive are given back to the queue.

``ModalContainer`` wires this to the ComfyUI supervisor for the two ``@modal.enter`` phases: ComfyUI
started on the CPU before the memory snapshot, the GPU bound after the restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfyfleet.config import Settings
from comfyfleet.jobs import repository as repo
from comfyfleet.queue.bus import NEW_WORK
from comfyfleet.queue.claim import claim_dispatched
from comfyfleet.queue.executor import Failed, JobContext, JobExecutor, Outcome, Retry
from comfyfleet.queue.worker_loop import run_claimed
from comfyfleet.runtime import Runtime
from comfyfleet.worker.local import build_executors

if TYPE_CHECKING:
    from comfyfleet.worker.comfy.supervisor import MpsDaemon, SlotSpec, Supervisor

log = logging.getLogger(__name__)

# Where the image puts things (modal_app.py builds the image with these paths).
COMFY_ROOT = "/opt/comfyui"
COMFYUI_DIR = f"{COMFY_ROOT}/ComfyUI"
COMFY_VENV = f"{COMFY_ROOT}/venv"
COMFY_PYTHON = f"{COMFY_VENV}/bin/python"
SNAPSHOT_NODE_NAME = "comfyfleet_snapshot"
MODELS_DIR = "/models"
# The container's own disk; nothing else shares it.
SLOTS_DIR = "/tmp/comfyfleet/slots"  # noqa: S108
MPS_DIR = "/tmp/comfyfleet/mps"  # noqa: S108

UNANSWERED_LIMIT = 3  # consecutive failed /system_stats probes of one slot that make the container sick
FRESH_CHECK_S = 1.0  # a health check this recent is reused by the next job instead of probing again
RESTORE_TIMEOUT_S = 180.0

# Modules imported before the snapshot, so a restored container does not pay for them.
HEAVY_MODULES = (
    "comfyfleet.worker.local",
    "comfyfleet.worker.runner",
    "comfyfleet.storage.configured",
    "comfyfleet.queue.bus",
    "sqlalchemy.ext.asyncio",
    "httpx",
)
OPTIONAL_HEAVY_MODULES = ("asyncpg", "boto3", "botocore")


# ------------------------------------------------------------------------------------------ health


@dataclass(frozen=True)
class SlotProbe:
    """What one look at a ComfyUI slot found."""

    index: int
    state: str  # the supervisor's slot state: ready, starting, restarting, unhealthy, failed...
    answers: bool  # /system_stats answered 200
    running_prompt: str | None = None
    pid: int | None = None
    rss_mib: float | None = None


Probe = Callable[[], Awaitable[Sequence[SlotProbe]]]
OnSick = Callable[[str], Awaitable[None]]


@dataclass
class _SlotHistory:
    unanswered: int = 0
    prompt: str | None = None
    prompt_since: float = 0.0
    pid: int | None = None
    baseline_mib: float | None = None
    baseline_due: bool = False


class HealthMonitor:
    """Decides when this container is sick; once sick it stays sick (the container drains and exits)."""

    def __init__(
        self,
        probe: Probe,
        *,
        stuck_prompt_s: float,
        memory_growth_limit_mib: float | None,
        on_sick: OnSick | None = None,
        unanswered_limit: int = UNANSWERED_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._stuck_prompt_s = stuck_prompt_s
        self._memory_limit = memory_growth_limit_mib
        self._on_sick = on_sick
        self._unanswered_limit = unanswered_limit
        self._clock = clock
        self._slots: dict[int, _SlotHistory] = {}
        self._lock = asyncio.Lock()
        self._checked_at: float | None = None
        self.sick = asyncio.Event()
        self.reason: str | None = None

    def job_finished(self, slot: int) -> None:
        """The slot's memory after a job (models loaded) is its baseline for growth."""
        self._history(slot).baseline_due = True

    def assess(self, probes: Sequence[SlotProbe]) -> str | None:
        """Record the probes; the first reason to call the container sick, or None."""
        reasons = [r for probe in probes if (r := self._assess_slot(probe)) is not None]
        return reasons[0] if reasons else None

    def _assess_slot(self, probe: SlotProbe) -> str | None:
        history = self._history(probe.index)
        now = self._clock()
        if probe.pid != history.pid:  # a restarted process starts a new memory history
            history.pid, history.baseline_mib = probe.pid, None
        if probe.state == "failed":
            return f"ComfyUI slot {probe.index} failed to start"
        if probe.answers:
            history.unanswered = 0
        elif probe.state not in ("starting", "restarting"):
            history.unanswered += 1
            if history.unanswered >= self._unanswered_limit:
                return f"ComfyUI slot {probe.index} did not answer /system_stats {history.unanswered} times"
        if probe.running_prompt != history.prompt:
            history.prompt, history.prompt_since = probe.running_prompt, now
        elif probe.running_prompt is not None and now - history.prompt_since > self._stuck_prompt_s:
            return (
                f"ComfyUI slot {probe.index} has run prompt {probe.running_prompt} for "
                f"{now - history.prompt_since:.0f}s (limit {self._stuck_prompt_s:g}s)"
            )
        return self._assess_memory(probe, history)

    def _assess_memory(self, probe: SlotProbe, history: _SlotHistory) -> str | None:
        if probe.rss_mib is None or self._memory_limit is None:
            return None
        if history.baseline_due:
            history.baseline_mib, history.baseline_due = probe.rss_mib, False
            return None
        if history.baseline_mib is not None and probe.rss_mib - history.baseline_mib > self._memory_limit:
            return (
                f"ComfyUI slot {probe.index} grew by {probe.rss_mib - history.baseline_mib:.0f} MiB since "
                f"its first job (limit {self._memory_limit:g} MiB)"
            )
        return None

    def _history(self, slot: int) -> _SlotHistory:
        return self._slots.setdefault(slot, _SlotHistory())

    async def check(self, *, max_age: float = 0.0) -> str | None:
        """Probe (unless a check younger than ``max_age`` exists) and act on the verdict."""
        async with self._lock:
            if self.sick.is_set():
                return self.reason
            if self._checked_at is not None and self._clock() - self._checked_at < max_age:
                return None
            try:
                reason = self.assess(await self._probe())
            except Exception:  # a probe that breaks says nothing about ComfyUI; log, stay well
                log.exception("health probe failed")
                reason = None
            self._checked_at = self._clock()
        if reason is not None:
            await self.declare_sick(reason)
        return reason

    async def declare_sick(self, reason: str) -> None:
        if self.sick.is_set():
            return
        self.reason = reason
        self.sick.set()
        log.error("container unhealthy, taking it out of rotation: %s", reason)
        if self._on_sick is not None:
            try:
                await self._on_sick(reason)
            except Exception:
                log.exception("stop_fetching_inputs failed")

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        while not stop.is_set() and not self.sick.is_set():
            await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


# ------------------------------------------------------------------------------------------- slots


@dataclass
class Slot:
    index: int
    executor: JobExecutor
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    needs_reset: bool = False


ResetSlot = Callable[[int], Awaitable[None]]


class SlotPool:
    """The container's ComfyUI slots; a job holds one for its whole run."""

    def __init__(self, executors: Sequence[JobExecutor], *, reset: ResetSlot | None = None) -> None:
        if not executors:
            raise ValueError("a container needs at least one slot")
        self._executors = list(executors)
        self._reset = reset
        self._free: asyncio.Queue[int] = asyncio.Queue()
        for index in range(len(self._executors)):
            self._free.put_nowait(index)
        self.in_use: dict[int, Slot] = {}
        self._resets: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._executors)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        index = await self._free.get()
        slot = Slot(index=index, executor=self._executors[index])
        self.in_use[index] = slot
        try:
            yield slot
        finally:
            del self.in_use[index]
            if slot.needs_reset and self._reset is not None:
                task = asyncio.ensure_future(self._reset_then_free(index))
                self._resets.add(task)
                task.add_done_callback(self._resets.discard)
            else:
                self._free.put_nowait(index)

    async def _reset_then_free(self, index: int) -> None:
        assert self._reset is not None
        try:
            await self._reset(index)
        except Exception:
            log.exception("resetting ComfyUI slot %d failed", index)
        finally:
            self._free.put_nowait(index)

    def mark_lost(self, index: int) -> None:
        """The slot's ComfyUI died: the job it runs ends as Retry."""
        slot = self.in_use.get(index)
        if slot is not None:
            slot.lost.set()


@dataclass
class GuardedExecutor:
    """Runs a slot's executor, but ends the job as ``Retry`` when the container turns sick or the
    slot's ComfyUI dies, and as ``Failed(job_timeout)`` past the per-job timeout."""

    inner: JobExecutor
    sick: asyncio.Event
    lost: asyncio.Event
    timeout_s: float | None = None

    async def execute(self, ctx: JobContext) -> Outcome:
        run = asyncio.ensure_future(self.inner.execute(ctx))
        sick = asyncio.ensure_future(self.sick.wait())
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            done, _ = await asyncio.wait(
                {run, sick, lost}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if run in done:  # finished, even if sickness arrived at the same moment
                return run.result()
            if sick in done:
                return Retry("the container became unhealthy")
            if lost in done:
                return Retry("the ComfyUI slot running the job died")
            return Failed("job_timeout", f"The job ran longer than {self.timeout_s:g} s")
        finally:
            for task in (sick, lost, run):
                task.cancel()
            # Let the executor clean up (interrupt ComfyUI, remove scratch) before the slot is reused.
            await asyncio.gather(run, sick, lost, return_exceptions=True)


# ------------------------------------------------------------------------------------------ worker


class ContainerWorker:
    """One Modal container's job side: slots, health, and the per-input ``run_job``."""

    def __init__(
        self,
        runtime: Runtime,
        executors: Sequence[JobExecutor],
        *,
        name: str,
        health: HealthMonitor | None = None,
        reset_slot: ResetSlot | None = None,
        job_timeout_s: float | None = None,
    ) -> None:
        self.runtime = runtime
        self.name = name
        self.pool = SlotPool(executors, reset=reset_slot)
        self.health = health
        self.sick = health.sick if health is not None else asyncio.Event()
        self.job_timeout_s = job_timeout_s

    async def run_job(self, job_id: str, dispatch_ref: str) -> str:
        """Run one dispatched job; returns what happened (for logs; the database has the truth)."""
        if await self._unwell():
            return await self._give_back(job_id, dispatch_ref)
        async with self.pool.slot() as slot:
            if self.sick.is_set():  # turned sick while this input waited for a slot
                return await self._give_back(job_id, dispatch_ref)
            worker = f"{self.name}-slot{slot.index}"
            job = await claim_dispatched(self.runtime, job_id, worker=worker, dispatch_ref=dispatch_ref)
            if job is None:
                return "not_claimed"  # stale or duplicate spawn: someone else has (or had) the job
            executor = GuardedExecutor(slot.executor, self.sick, slot.lost, self.job_timeout_s)
            try:
                row = await run_claimed(self.runtime, executor, job, worker)
            except asyncio.CancelledError:
                # Modal cancelled the input (the cancel backstop or its timeout) mid-prompt: reset the
                # slot before it runs another job. The job's lease lapses and the reaper ends it.
                slot.needs_reset = True
                raise
            if self.health is not None:
                self.health.job_finished(slot.index)
            return str(row.status) if row is not None else "lease_lost"

    def slot_lost(self, index: int) -> None:
        self.pool.mark_lost(index)

    async def _unwell(self) -> bool:
        if self.health is None:
            return self.sick.is_set()
        return await self.health.check(max_age=FRESH_CHECK_S) is not None

    async def _give_back(self, job_id: str, dispatch_ref: str) -> str:
        """Return an unclaimed job to the queue at once, instead of after the dispatch timeout."""
        async with self.runtime.engine.begin() as conn:
            released = await repo.clear_dispatch(conn, job_id, ref=dispatch_ref)
        if released:
            await self.runtime.bus.publish(NEW_WORK, {"job_id": job_id})
        return "given_back"


# ------------------------------------------------------------------------------- the Modal wiring


def container_name() -> str:
    task = os.environ.get("MODAL_TASK_ID") or f"{os.uname().nodename}-{os.getpid()}"
    return f"modal-{task}"


def import_heavy_modules() -> None:
    """Import before the snapshot what every job needs, so it is in the restored memory."""
    for name in HEAVY_MODULES:
        importlib.import_module(name)
    for name in OPTIONAL_HEAVY_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def slot_env(settings: Settings, mps: MpsDaemon | None) -> dict[str, str]:
    """Environment of every ComfyUI slot: threads per slot, snapshot mode, and MPS's pipe folder,
    which must be there when the process starts even though the daemon starts after the restore.
    (Our COMFYFLEET_* secrets never reach a slot: ``process.inherited_env`` leaves them out.)
    """
    from comfyfleet.deploy.snapshot_node.patch import ENV_VAR

    env: dict[str, str] = {}
    threads = str(settings.modal.threads_per_slot)
    env.update(settings.comfyui_slot_env)
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, ENV_VAR: "1"})
    if mps is not None:
        client = mps.client_env()
        env["CUDA_MPS_PIPE_DIRECTORY"] = client["CUDA_MPS_PIPE_DIRECTORY"]
        env["CUDA_MPS_LOG_DIRECTORY"] = client["CUDA_MPS_LOG_DIRECTORY"]
    return env


def read_rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class ModalContainer:
    """The GPU class's state across ``@modal.enter(snap=True)``, ``@modal.enter(snap=False)``, inputs
    and ``@modal.exit``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.supervisor: Supervisor | None = None
        self.mps: MpsDaemon | None = None
        self.worker: ContainerWorker | None = None
        self.runtime: Runtime | None = None
        self._stop = asyncio.Event()
        self._health_task: asyncio.Task[None] | None = None

    # -- before the snapshot: no GPU is attached

    async def start_comfyui(self) -> None:
        from comfyfleet.worker.comfy.supervisor import MpsDaemon, Supervisor

        import_heavy_modules()
        modal_settings = self.settings.modal
        # Made now only for its folder names; it is started after the restore, when there is a GPU.
        self.mps = MpsDaemon(0, Path(MPS_DIR)) if modal_settings.use_mps else None
        self.supervisor = Supervisor(
            install_dir=COMFYUI_DIR,
            base_dir=SLOTS_DIR,
            base_port=self.settings.comfyui_base_port,
            gpus=[0],  # one GPU per container: Modal scales by containers
            slots_per_gpu=modal_settings.slots_per_gpu,
            env=slot_env(self.settings, self.mps),
            use_mps=False,  # see bind_gpu
            python=COMFY_PYTHON,
            startup_timeout=float(modal_settings.startup_timeout_s),
            on_slot_lost=self._slot_lost,
        )
        # ComfyUI starts on the CPU (the snapshot node's patch) and is part of the snapshot.
        await self.supervisor.start()
        log.info("%d ComfyUI slot(s) started on the CPU for the snapshot", len(self.supervisor.instances))

    # -- after the restore: the GPU is attached

    async def bind_gpu(self) -> None:
        from comfyfleet.deploy.snapshot_node.patch import ENV_VAR

        supervisor = self._supervisor()
        device = await self._start_mps()
        await self._rebind_slots(device)
        supervisor.update_env({ENV_VAR: None})  # slots restarted later start on the GPU directly
        log.info("ComfyUI mode: %s (%s)", supervisor.mode, supervisor.mode_reason)
        self.runtime = runtime = await Runtime.create(self.settings)
        runtime.extras["supervisor"] = supervisor
        name = container_name()
        executors: list[JobExecutor] = list(await build_executors(runtime, supervisor, name))
        if len(executors) != len(supervisor.instances):
            raise RuntimeError(f"{len(executors)} executors for {len(supervisor.instances)} ComfyUI slots")
        modal_settings = self.settings.modal
        health = HealthMonitor(
            self._probe,
            stuck_prompt_s=modal_settings.stuck_prompt_s or float(modal_settings.job_timeout_s),
            memory_growth_limit_mib=modal_settings.memory_growth_limit_mib,
            on_sick=_stop_fetching_inputs,
        )
        self.worker = ContainerWorker(
            runtime,
            executors,
            name=name,
            health=health,
            reset_slot=self._reset_slot,
            job_timeout_s=float(modal_settings.job_timeout_s),
        )
        self._health_task = asyncio.ensure_future(health.run(self._stop, modal_settings.health_interval_s))

    async def _start_mps(self) -> str | None:
        """Start MPS for the slots' GPU if asked; they join it at their first CUDA call (the rebind).
        Returns the device the slots must use, or None for plain slots."""
        from comfyfleet.worker.comfy.supervisor import MpsUnavailable

        supervisor = self._supervisor()
        if self.mps is None:
            supervisor.mode, supervisor.mode_reason = "plain", "MPS not requested"
            return None
        try:
            await self.mps.start()
        except (MpsUnavailable, OSError) as exc:
            # The slots keep the pipe folder in their environment; with no daemon behind it CUDA
            # runs them as ordinary (time-sliced) clients.
            self.mps = None
            supervisor.mode = "plain"
            supervisor.mode_reason = f"MPS unavailable in this container, running plain slots ({exc})"
            log.warning("%s", supervisor.mode_reason)
            return None
        supervisor.mode, supervisor.mode_reason = "mps", "one MPS control daemon for the container's GPU"
        return self.mps.device

    async def _rebind_slots(self, device: str | None) -> None:
        import httpx

        from comfyfleet.deploy.snapshot_node.patch import RESTORE_PATH

        body = {"cuda_visible_devices": device} if device is not None else {}
        urls = [instance.url + RESTORE_PATH for instance in self._supervisor().instances]
        async with httpx.AsyncClient(timeout=RESTORE_TIMEOUT_S, trust_env=False) as client:
            responses = await asyncio.gather(*(client.post(url, json=body) for url in urls))
        for index, response in enumerate(responses):
            if response.status_code != 200:
                # Running jobs on the CPU of a GPU container is the failure to avoid: fail the start.
                raise RuntimeError(f"ComfyUI slot {index} could not bind the GPU: {response.text}")
            log.info("ComfyUI slot %d: %s", index, response.json())

    # -- inputs

    async def run_job(self, job_id: str, dispatch_ref: str) -> str:
        if self.worker is None:
            raise RuntimeError("the container did not finish starting")
        return await self.worker.run_job(job_id, dispatch_ref)

    async def _probe(self) -> list[SlotProbe]:
        import httpx

        instances = self._supervisor().instances
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            probes = [_probe_slot(client, index, instance) for index, instance in enumerate(instances)]
            return list(await asyncio.gather(*probes))

    async def _slot_lost(self, spec: SlotSpec) -> None:
        if self.worker is None:
            return
        self.worker.slot_lost(spec.index)
        if self.mps is not None and self.worker.health is not None:
            # Under MPS a GPU fault takes every slot of the GPU down: replace the whole container.
            await self.worker.health.declare_sick(f"ComfyUI slot {spec.index} died under MPS")

    async def _reset_slot(self, index: int) -> None:
        await self._supervisor().instances[index].restart()

    # -- exit

    async def close(self) -> None:
        self._stop.set()
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self.mps is not None:
            await self.mps.stop()
        if self.runtime is not None:
            await self.runtime.close()

    def _supervisor(self) -> Supervisor:
        if self.supervisor is None:
            raise RuntimeError("ComfyUI was not started (the snap=True enter did not run)")
        return self.supervisor


async def _probe_slot(client: Any, index: int, instance: Any) -> SlotProbe:
    status = instance.status()
    answers = await instance.healthy()
    running: str | None = None
    if answers:
        with contextlib.suppress(Exception):
            queue = (await client.get(instance.url + "/queue")).json()
            items = queue.get("queue_running") or []
            running = str(items[0][1]) if items else None
    return SlotProbe(
        index=index,
        state=status.state,
        answers=answers,
        running_prompt=running,
        pid=status.pid,
        rss_mib=read_rss_mib(status.pid),
    )


async def _stop_fetching_inputs(reason: str) -> None:
    import modal.experimental

    await modal.experimental.stop_fetching_inputs.aio()
