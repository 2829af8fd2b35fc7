"""Real cancel: a queued job never reaches ComfyUI, a running prompt is interrupted in ComfyUI and
the job ends canceled without outputs, and a cancel that races the last node never lets the job end
succeeded once the cancel was accepted."""

from __future__ import annotations

import asyncio
import random
import statistics
from datetime import datetime

from comfyfleet.assets import repository as asset_repo
from tests.fakes.fixtures import ComfyTarget
from tests.integration.worker.conftest import Service, StartService
from tests.integration.worker.helpers import JobBody, comfy_saw_prompt, prompt_id, slow_sampler
from tests.support.workflows import empty_image_save

ACCEPTED = ("canceling", "canceled")


async def test_cancel_while_queued_never_reaches_comfyui(service: Service, comfyui_standin: object) -> None:
    jobs = service.jobs
    blocker = await jobs.submit(slow_sampler(steps=2000, seconds_per_step=0.01))
    await jobs.wait_for(blocker["id"], lambda j: j["status"] == "running", what="running")
    queued = await jobs.submit(empty_image_save(color=7))  # one worker slot, busy: this one waits
    assert queued["status"] == "queued"

    answer = await jobs.cancel(queued["id"])

    assert answer["status"] == "canceled"
    assert (await jobs.cancel(blocker["id"]))["status"] in ACCEPTED
    assert (await jobs.wait_terminal(blocker["id"]))["status"] == "canceled"
    final = await jobs.get(queued["id"])
    assert final["status"] == "canceled" and final["outputs"] == [] and final["started_at"] is None
    assert not await comfy_saw_prompt(service.target, queued["id"])


async def test_cancel_while_running_interrupts_the_prompt_in_comfyui(
    service: Service, comfyui_target: ComfyTarget
) -> None:
    standin = comfyui_target.require_standin("reads the stand-in's interrupt log")
    jobs = service.jobs
    job = await jobs.submit(slow_sampler(steps=2000, seconds_per_step=0.01))
    # On the sampler node, with at least one step done: ComfyUI is really working on it.
    await jobs.wait_for(job["id"], lambda j: (j["progress"] or {}).get("step") or 0 >= 1, what="sampling")

    answer = await jobs.cancel(job["id"])

    assert answer["status"] == "canceling"
    final = await jobs.wait_terminal(job["id"])
    assert final["status"] == "canceled"
    stopped = [i for i in standin.log.interrupts if i.stopped_prompt_id == prompt_id(job["id"])]
    assert stopped and stopped[0].requested_prompt_id == prompt_id(job["id"])
    assert final["outputs"] == []
    async with service.runtime.engine.connect() as conn:
        assert await asset_repo.outputs_for_job(conn, service.tenant.id, job["id"]) == []
    # The job's folders in ComfyUI's output are gone or empty: nothing was saved for it.
    assert not list((standin.output_dir / "jobs" / job["id"]).rglob("*.png"))
    # The slot is free again and runs the next job.
    after = await jobs.submit(empty_image_save(color=3))
    assert (await jobs.wait_terminal(after["id"]))["status"] == "succeeded"


async def test_cancel_racing_the_last_node_never_ends_succeeded(
    start_service: StartService, comfyui_standin: object
) -> None:
    service = await start_service(worker_slots=2)
    jobs = service.jobs
    rng = random.Random(20260107)  # fixed seed: the same spread of timings on every run
    # A short job whose last node is the one the cancel races. Its duration is measured on a few
    # warm runs (the median, so one slow run does not stretch it), then cancels land anywhere from
    # before the claim to after the end.
    spans = []
    for color in (1, 2, 3, 4, 5):
        probe = await jobs.submit(slow_sampler(steps=2, seconds_per_step=0.01, color=color))
        probe = await jobs.wait_terminal(probe["id"])
        assert probe["status"] == "succeeded"
        done = datetime.fromisoformat(probe["completed_at"]) - datetime.fromisoformat(probe["created_at"])
        spans.append(done.total_seconds())
    span_s = statistics.median(spans) * 1.2

    async def one(index: int) -> tuple[JobBody, JobBody]:
        job = await jobs.submit(slow_sampler(steps=2, seconds_per_step=0.01, color=100 + index))
        await asyncio.sleep(rng.uniform(0, span_s))
        answer = await jobs.cancel(job["id"])
        return answer, await jobs.wait_terminal(job["id"])

    results = [await one(index) for index in range(40)]
    for answer, final in results:
        if answer["status"] in ACCEPTED:
            assert final["status"] == "canceled", final
            # The cancel's answer lists the outputs committed before it was accepted (it reads them in
            # the cancel's own transaction); none may be committed after.
            assert output_ids(final) == output_ids(answer), (answer, final)
        else:
            assert answer["status"] == final["status"] == "succeeded", (answer, final)
    outcomes = {(answer["status"], final["status"]) for answer, final in results}
    # The timings did spread: some cancels won and some came too late (else the test proved little).
    assert ("canceling", "canceled") in outcomes or ("canceled", "canceled") in outcomes, outcomes


def output_ids(job: JobBody) -> set[str]:
    return {output["id"] for output in job["outputs"]}
