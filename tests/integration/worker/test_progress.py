"""The contract's progress snapshot, live: in GET and over SSE, computed from ComfyUI's events, and
throttled before it reaches the database (``progress_interval_s``), with the newest snapshot of a
burst written once the interval has passed rather than dropped."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import datetime
from typing import Any

import pytest

from comfyfleet.jobs import repository as job_repo
from tests.fakes.comfyui import Standin
from tests.integration.worker.conftest import Service, StartService
from tests.integration.worker.helpers import TERMINAL, follow_sse, slow_sampler

SNAPSHOT_KEYS = {
    "value",
    "nodes_done",
    "nodes_total",
    "current_node",
    "current_node_class",
    "step",
    "steps",
    "message",
}


async def test_progress_snapshot_in_get_and_sse(service: Service, comfyui_standin: Standin) -> None:
    job = await service.jobs.submit(slow_sampler(steps=20, seconds_per_step=0.05))
    stream = asyncio.create_task(follow_sse(service.http, job["id"]))

    sampling = await service.jobs.wait_for(
        job["id"], lambda j: (j["progress"] or {}).get("step") is not None, what="on a sampler step"
    )
    progress = sampling["progress"]
    assert set(progress) == SNAPSHOT_KEYS, progress
    assert progress["current_node"] == "2" and progress["current_node_class"] == "StandinSlowSampler"
    assert progress["steps"] == 20 and 1 <= progress["step"] <= 20
    assert progress["nodes_total"] == 3 and progress["nodes_done"] >= 1
    assert 0 < progress["value"] < 1
    assert progress["message"] == f"StandinSlowSampler {progress['step']}/20"

    events = await asyncio.wait_for(stream, 30)
    final = await service.jobs.get(job["id"])
    assert final["status"] == "succeeded"
    assert final["progress"]["value"] == 1.0 and final["progress"]["nodes_done"] == 3
    streamed = events.of("progress")
    assert streamed and all(set(p) == SNAPSHOT_KEYS for p in streamed)
    assert any(p["current_node_class"] == "StandinSlowSampler" and p["step"] for p in streamed)
    values = [p["value"] for p in streamed]
    assert values == sorted(values) and values[-1] == 1.0  # never goes back, ends complete
    assert events.statuses[-1] == "succeeded"


INTERVAL = 0.3


@pytest.fixture
def progress_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, dict[str, Any]]]:
    """Every progress write the workers make: (monotonic time, snapshot)."""
    writes: list[tuple[float, dict[str, Any]]] = []
    original = job_repo.set_progress

    async def recording(conn: Any, job_id: str, *, worker: str, progress: dict[str, Any]) -> None:
        writes.append((time.monotonic(), progress))
        await original(conn, job_id, worker=worker, progress=progress)

    monkeypatch.setattr(job_repo, "set_progress", recording)
    return writes


async def test_progress_writes_are_throttled(
    start_service: StartService, comfyui_standin: Standin, progress_writes: list[tuple[float, dict[str, Any]]]
) -> None:
    service = await start_service(progress_interval_s=INTERVAL)
    job = await service.jobs.submit(slow_sampler(steps=40, seconds_per_step=0.02))
    final = await service.jobs.wait_terminal(job["id"])
    assert final["status"] == "succeeded" and final["progress"]["value"] == 1.0

    # ComfyUI sent about three events per step; the database got a handful of writes. The gaps are
    # checked against half the interval: the recorded moment lags the throttle's decision by the
    # database's latency, which varies, while an unthrottled writer would write every few ms.
    started = datetime.fromisoformat(final["started_at"])
    duration = (datetime.fromisoformat(final["completed_at"]) - started).total_seconds()
    assert 2 <= len(progress_writes) <= duration / INTERVAL + 2, (len(progress_writes), duration)
    offsets = [round(t - progress_writes[0][0], 3) for t, _ in progress_writes]
    for (earlier, _), (later, _) in itertools.pairwise(progress_writes):
        assert later - earlier >= INTERVAL / 2, offsets


async def test_the_newest_snapshot_of_a_burst_is_written_after_the_interval(
    start_service: StartService, comfyui_standin: Standin
) -> None:
    service = await start_service(progress_interval_s=INTERVAL)
    # A burst (a sampler with instant steps) and then a long node without progress of its own: the
    # snapshot naming the long node arrives within the burst's interval and must still be written.
    comfyui_standin.set_config(node_delays={"ImageBlur": 3.0})
    workflow = slow_sampler(steps=5, seconds_per_step=0.0)
    workflow["3"]["inputs"]["images"] = ["4", 0]
    workflow["4"] = {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], "blur_radius": 1, "sigma": 1.0}}
    job = await service.jobs.submit(workflow)
    blurring = await service.jobs.wait_for(
        job["id"],
        lambda j: j["status"] in TERMINAL or (j["progress"] or {}).get("current_node_class") == "ImageBlur",
        what="showing ImageBlur",
        timeout=30,
    )
    assert blurring["status"] == "running", blurring
    assert blurring["progress"]["nodes_done"] == 2
    assert (await service.jobs.wait_terminal(job["id"]))["status"] == "succeeded"
