"""A worker slot's ComfyUI dies mid-job (SIGKILL): the job goes back to the queue, runs again on a
slot that is up, and succeeds exactly once. The service supervises two stand-in processes started
from a fake ComfyUI install (tests/fixtures/standin_install), as ``comfyfleet serve --comfyui-dir``
supervises ComfyUI. SQLite only: the behaviour under test is the worker's, and process start-ups
make it one of the slow tests."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest

from comfyfleet.worker.comfy.supervisor import ComfyInstance, ComfyProcess, Supervisor
from tests.integration.worker.conftest import StartService
from tests.integration.worker.helpers import eventually, prompt_id, slow_sampler

pytestmark = pytest.mark.slow

INSTALL = Path(__file__).resolve().parents[2] / "fixtures" / "standin_install"


def free_port_pair() -> int:
    """A base port whose successor is free too (the supervisor gives slot i the port base + i)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            base = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", base + 1))
                except OSError:
                    continue
                return base
    raise RuntimeError("no two consecutive free ports")


async def _ready(instance: ComfyInstance) -> bool:
    status = instance.status()
    return status.ready and status.pid is not None


async def prompts_seen(url: str) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=5) as comfy:
        log = (await comfy.get("/__standin/log")).json()
    return [str(p["prompt_id"]) for p in log["prompts"] if p["accepted"]]


@pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)
async def test_a_killed_slot_is_retried_on_a_healthy_slot_and_succeeds_once(
    start_service: StartService,
) -> None:
    service = await start_service(
        comfyui_url=None,
        comfyui_dir=INSTALL,
        comfyui_python=sys.executable,
        worker_slots=2,
        comfyui_base_port=free_port_pair(),
    )
    supervisor: Supervisor = service.runtime.extras["supervisor"]
    slots = [i for i in supervisor.instances if isinstance(i, ComfyProcess)]
    assert len(slots) == 2
    jobs = service.jobs
    job = await jobs.submit(slow_sampler(steps=300, seconds_per_step=0.01))
    await jobs.wait_for(job["id"], lambda j: ((j["progress"] or {}).get("step") or 0) >= 1, what="sampling")
    first = prompt_id(job["id"], 1)
    victims = [i for i in slots if first in await prompts_seen(i.url)]
    assert len(victims) == 1
    victim = victims[0]
    pid = victim.status().pid
    assert pid is not None

    os.kill(pid, signal.SIGKILL)

    final = await jobs.wait_terminal(job["id"], timeout=60)
    assert final["status"] == "succeeded", final
    assert final["metrics"]["attempts"] == 2
    assert len(final["outputs"]) == 1  # committed once, by the attempt that finished
    second = prompt_id(job["id"], 2)
    ran_second = [i for i in slots if second in await prompts_seen(i.url)]
    # The other slot ran it: the dead slot's worker takes no job until its ComfyUI is back.
    assert [i.spec.index for i in ran_second] == [i.spec.index for i in slots if i is not victim]
    # The supervisor brought the killed ComfyUI back.
    await eventually(lambda: _ready(victim), what="the killed slot to be back")
