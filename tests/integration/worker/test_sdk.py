"""The official comfy-sdk against the live service: ``job.events()`` streams progress, the output and
the terminal status; ``job.cancel()`` stops a running job, which then ends canceled."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import cast

import pytest
from comfy_sdk import AsyncComfy
from comfy_sdk.events import Event, OutputReady, Progress, StatusChange

from tests.fakes.comfyui import Standin
from tests.integration.worker.conftest import Service
from tests.integration.worker.helpers import slow_sampler

pytestmark = pytest.mark.slow


def sdk(service: Service, monkeypatch: pytest.MonkeyPatch) -> AsyncComfy:
    monkeypatch.setenv("COMFY_BASE_URL", service.server.url)
    return AsyncComfy(api_key=service.tenant.key)


async def test_sdk_job_events(
    service: Service, comfyui_standin: Standin, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with sdk(service, monkeypatch) as client:
        job = await client.submit(client.workflows.from_json(slow_sampler(steps=10, seconds_per_step=0.05)))
        events = [event async for event in job.events()]
    progress = [e for e in events if isinstance(e, Progress)]
    outputs = [e for e in events if isinstance(e, OutputReady)]
    statuses = [e.status for e in events if isinstance(e, StatusChange)]
    assert progress and progress[-1].value == 1.0
    assert any(p.current_node == "2" and p.steps == 10 for p in progress)
    assert len(outputs) == 1 and outputs[0].output.node_id == "3"
    assert statuses[-1] == "succeeded" and "running" in statuses


async def test_sdk_job_cancel(
    service: Service, comfyui_standin: Standin, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with sdk(service, monkeypatch) as client:
        job = await client.submit(client.workflows.from_json(slow_sampler(steps=2000, seconds_per_step=0.01)))
        async with contextlib.aclosing(cast(AsyncGenerator[Event, None], job.events())) as stream:
            async for event in stream:
                if isinstance(event, Progress) and event.step:
                    break  # ComfyUI is sampling
        await job.cancel()
        assert job.status in ("canceling", "canceled")
        await job.wait(timeout=30)
    assert job.status == "canceled"
    assert job.outputs == []
    assert any(i.stopped_prompt_id == f"{job.id}-1" for i in comfyui_standin.log.interrupts)
