"""The GPU container's health verdicts and job guard, without Modal or a database."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from comfyfleet.deploy.modal_worker import GuardedExecutor, HealthMonitor, SlotPool, SlotProbe
from comfyfleet.queue.executor import Failed, JobContext, Outcome, Retry, Succeeded


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Probes:
    """The slots' answers, as a test sets them."""

    def __init__(self, *probes: SlotProbe) -> None:
        self.current: list[SlotProbe] = list(probes)

    async def __call__(self) -> Sequence[SlotProbe]:
        return self.current


def healthy(index: int = 0, **fields: object) -> SlotProbe:
    values: dict[str, object] = {"index": index, "state": "ready", "answers": True, "pid": 100 + index}
    values.update(fields)
    return SlotProbe(**values)  # type: ignore[arg-type]


def monitor(probes: Probes, clock: FakeClock, sick_calls: list[str] | None = None) -> HealthMonitor:
    async def on_sick(reason: str) -> None:
        if sick_calls is not None:
            sick_calls.append(reason)

    return HealthMonitor(
        probes, stuck_prompt_s=60, memory_growth_limit_mib=1000, on_sick=on_sick, clock=clock
    )


async def test_a_healthy_container_stays_in_rotation() -> None:
    probes, clock = Probes(healthy(0), healthy(1)), FakeClock()
    health = monitor(probes, clock)
    for _ in range(5):
        assert await health.check() is None
        clock.now += 15
    assert not health.sick.is_set()


async def test_a_slot_that_stops_answering_makes_the_container_sick_once() -> None:
    probes, clock, calls = Probes(healthy(0)), FakeClock(), list[str]()
    health = monitor(probes, clock, calls)
    probes.current = [healthy(0, answers=False, state="unhealthy")]
    assert await health.check() is None  # one missed probe is not a verdict
    assert await health.check() is None
    reason = await health.check()
    assert reason is not None and "did not answer /system_stats 3 times" in reason
    assert health.sick.is_set()
    await health.check()
    await health.declare_sick("again")
    assert len(calls) == 1  # stop_fetching_inputs is called once


async def test_a_slot_being_restarted_is_not_counted_as_unanswered() -> None:
    probes, clock = Probes(healthy(0, answers=False, state="restarting")), FakeClock()
    health = monitor(probes, clock)
    for _ in range(5):
        assert await health.check() is None


async def test_a_slot_that_failed_to_start_is_sick_at_once() -> None:
    health = monitor(Probes(healthy(0), healthy(1, state="failed", answers=False)), FakeClock())
    reason = await health.check()
    assert reason == "ComfyUI slot 1 failed to start"


async def test_a_prompt_running_past_the_limit_is_stuck() -> None:
    probes, clock = Probes(healthy(0, running_prompt="p1")), FakeClock()
    health = monitor(probes, clock)
    assert await health.check() is None
    clock.now += 59
    assert await health.check() is None
    probes.current = [healthy(0, running_prompt="p2")]  # a new prompt restarts the count
    clock.now += 30
    assert await health.check() is None
    clock.now += 61
    reason = await health.check()
    assert reason is not None and "prompt p2" in reason


async def test_memory_growth_is_measured_from_the_first_job() -> None:
    probes, clock = Probes(healthy(0, rss_mib=500.0)), FakeClock()
    health = monitor(probes, clock)
    probes.current = [healthy(0, rss_mib=4000.0)]  # models loaded: no baseline yet, not a leak
    assert await health.check() is None
    health.job_finished(0)
    assert await health.check() is None  # baseline 4000
    probes.current = [healthy(0, rss_mib=4900.0)]
    assert await health.check() is None
    probes.current = [healthy(0, pid=555, rss_mib=9000.0)]  # a restarted process has no baseline
    assert await health.check() is None
    health.job_finished(0)
    assert await health.check() is None  # baseline 9000
    probes.current = [healthy(0, pid=555, rss_mib=10100.0)]
    reason = await health.check()
    assert reason is not None and "grew by 1100 MiB" in reason


async def test_a_recent_check_is_reused_before_a_job() -> None:
    calls = 0

    async def probe() -> Sequence[SlotProbe]:
        nonlocal calls
        calls += 1
        return [healthy(0)]

    clock = FakeClock()
    health = HealthMonitor(probe, stuck_prompt_s=60, memory_growth_limit_mib=None, clock=clock)
    await health.check(max_age=1.0)
    await health.check(max_age=1.0)
    clock.now += 2
    await health.check(max_age=1.0)
    assert calls == 2


async def test_a_broken_probe_does_not_make_the_container_sick() -> None:
    async def probe() -> Sequence[SlotProbe]:
        raise RuntimeError("bug in the probe")

    health = HealthMonitor(probe, stuck_prompt_s=60, memory_growth_limit_mib=None)
    assert await health.check() is None
    assert not health.sick.is_set()


# ---------------------------------------------------------------------------- the job guard


class Forever:
    """An executor whose job never ends by itself; records that it was stopped."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.stopped = False

    async def execute(self, ctx: JobContext) -> Outcome:
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.stopped = True
        return Succeeded()


class Quick:
    async def execute(self, ctx: JobContext) -> Outcome:
        return Succeeded()


def ctx() -> JobContext:
    return JobContext(job=None, worker="w")  # type: ignore[arg-type]


async def test_the_guard_passes_the_outcome_through() -> None:
    guard = GuardedExecutor(Quick(), asyncio.Event(), asyncio.Event())
    assert await guard.execute(ctx()) == Succeeded()


@pytest.mark.parametrize("which", ["sick", "lost"])
async def test_a_sick_container_or_a_dead_slot_ends_the_job_as_retry(which: str) -> None:
    inner, sick, lost = Forever(), asyncio.Event(), asyncio.Event()
    task = asyncio.ensure_future(GuardedExecutor(inner, sick, lost).execute(ctx()))
    await inner.started.wait()
    (sick if which == "sick" else lost).set()
    outcome = await task
    assert isinstance(outcome, Retry)
    assert inner.stopped  # the executor was stopped before the slot is reused


async def test_a_job_past_the_timeout_fails() -> None:
    inner = Forever()
    outcome = await GuardedExecutor(inner, asyncio.Event(), asyncio.Event(), timeout_s=0.01).execute(ctx())
    assert isinstance(outcome, Failed) and outcome.code == "job_timeout"
    assert inner.stopped


async def test_cancelling_the_input_stops_the_executor() -> None:
    inner = Forever()
    task = asyncio.ensure_future(GuardedExecutor(inner, asyncio.Event(), asyncio.Event()).execute(ctx()))
    await inner.started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert inner.stopped


async def test_a_slot_marked_for_reset_is_reset_before_its_next_job() -> None:
    resets: list[int] = []
    reset_done = asyncio.Event()

    async def reset(index: int) -> None:
        resets.append(index)
        reset_done.set()

    pool = SlotPool([Quick()], reset=reset)
    async with pool.slot() as slot:
        slot.needs_reset = True
    async with pool.slot() as slot:  # waits for the reset to give the slot back
        assert resets == [0] and reset_done.is_set()
        assert not slot.needs_reset


def test_comfyui_slots_do_not_inherit_our_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    from comfyfleet.config import Settings
    from comfyfleet.deploy.modal_worker import slot_env
    from comfyfleet.deploy.snapshot_node.patch import ENV_VAR
    from comfyfleet.worker.comfy.process import inherited_env

    monkeypatch.setenv("COMFYFLEET_DATABASE_URL", "not-for-nodes")
    monkeypatch.setenv("COMFYFLEET_KEY_PEPPER", "no")
    monkeypatch.setenv("PATH", "/bin")
    env = {**inherited_env(), **slot_env(Settings(), None)}
    assert "COMFYFLEET_DATABASE_URL" not in env and "COMFYFLEET_KEY_PEPPER" not in env
    assert env["PATH"] == "/bin"
    assert env[ENV_VAR] == "1" and env["OMP_NUM_THREADS"] == "1"


# ------------------------------------------------------------- binding the GPU after the restore


class FakeSupervisor:
    """The part of the ComfyUI supervisor the restore path uses."""

    def __init__(self, urls: list[str]) -> None:
        from types import SimpleNamespace

        self.instances = [SimpleNamespace(url=url) for url in urls]
        self.mode, self.mode_reason = "plain", "not started"
        self.env_changes: list[dict[str, str | None]] = []

    def update_env(self, changes: dict[str, str | None]) -> None:
        self.env_changes.append(dict(changes))


async def slot_server(status: int | None = None) -> Any:
    """A ComfyUI slot's HTTP surface with the snapshot node's routes (or a restore that fails)."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from comfyfleet.deploy import snapshot_node

    routes = web.RouteTableDef()
    if status is None:
        snapshot_node.register_routes(routes)
    else:

        @routes.post(snapshot_node.RESTORE_PATH)
        async def restore(request: web.Request) -> web.Response:
            return web.json_response({"error": "CUDA is not available"}, status=status)

    app = web.Application()
    app.add_routes(routes)
    server = TestServer(app)
    await server.start_server()
    return server


def url_of(server: Any) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_without_an_mps_daemon_the_slots_run_plain_and_say_why(tmp_path: Path) -> None:
    from comfyfleet.config import Settings
    from comfyfleet.deploy.modal_worker import ModalContainer
    from comfyfleet.worker.comfy.supervisor import MpsDaemon

    container = ModalContainer(Settings())
    supervisor = FakeSupervisor([])
    container.supervisor = supervisor  # type: ignore[assignment]
    container.mps = MpsDaemon(0, tmp_path, control="no-such-nvidia-cuda-mps-control")
    assert await container._start_mps() is None
    assert supervisor.mode == "plain" and "MPS unavailable" in supervisor.mode_reason
    assert container.mps is None  # nothing to stop at exit


async def test_every_slot_binds_the_gpu_through_the_snapshot_node() -> None:
    from comfyfleet.config import Settings
    from comfyfleet.deploy.modal_worker import ModalContainer

    servers = [await slot_server(), await slot_server()]
    try:
        container = ModalContainer(Settings())
        container.supervisor = FakeSupervisor([url_of(s) for s in servers])  # type: ignore[assignment]
        await container._rebind_slots(None)  # outside ComfyUI the node answers patched=false
        failing = await slot_server(status=500)
        servers.append(failing)
        container.supervisor = FakeSupervisor([url_of(failing)])  # type: ignore[assignment]
        with pytest.raises(RuntimeError, match="could not bind the GPU"):
            await container._rebind_slots("GPU-1234")
    finally:
        for server in servers:
            await server.close()
