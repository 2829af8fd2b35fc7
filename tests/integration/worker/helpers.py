"""A small HTTP client for the worker tests: submit, poll, cancel and follow a job's SSE stream
against a live comfyfleet, plus what ComfyUI (stand-in or real) saw of a job."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.fakes.fixtures import ComfyTarget

TERMINAL = frozenset({"succeeded", "canceled", "failed", "expired"})
JobBody = dict[str, Any]


def slow_sampler(steps: int, seconds_per_step: float, color: int = 0) -> dict[str, Any]:
    """EmptyImage → StandinSlowSampler → SaveImage: a job that stays running on its sampler node."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color},
        },
        "2": {
            "class_type": "StandinSlowSampler",
            "inputs": {"image": ["1", 0], "steps": steps, "seconds_per_step": seconds_per_step},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "slow"}},
    }


def prompt_id(job_id: str, attempt: int = 1) -> str:
    """The prompt id the runner gives a job's attempt on ComfyUI."""
    return f"{job_id}-{attempt}"


@dataclass
class JobsClient:
    http: httpx.AsyncClient

    async def submit(self, workflow: dict[str, Any], *, expect: int = 201) -> JobBody:
        response = await self.http.post("/api/v2/jobs", json={"workflow": workflow})
        assert response.status_code == expect, response.text
        body: JobBody = response.json()
        return body

    async def get(self, job_id: str) -> JobBody:
        response = await self.http.get(f"/api/v2/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body: JobBody = response.json()
        return body

    async def cancel(self, job_id: str) -> JobBody:
        response = await self.http.post(f"/api/v2/jobs/{job_id}/cancel")
        assert response.status_code == 200, response.text
        body: JobBody = response.json()
        return body

    async def wait_for(
        self, job_id: str, predicate: Callable[[JobBody], bool], *, timeout: float = 30.0, what: str = ""
    ) -> JobBody:
        """Poll until ``predicate(job)``; fails with the last body at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            job = await self.get(job_id)
            if predicate(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} never became {what or predicate}: {job}")
            await asyncio.sleep(0.02)

    async def wait_terminal(self, job_id: str, timeout: float = 30.0) -> JobBody:
        return await self.wait_for(
            job_id, lambda j: j["status"] in TERMINAL, timeout=timeout, what="terminal"
        )


@dataclass
class SseEvent:
    event: str
    data: Any


@dataclass
class SseLog:
    events: list[SseEvent] = field(default_factory=list)

    def of(self, kind: str) -> list[Any]:
        return [e.data for e in self.events if e.event == kind]

    @property
    def statuses(self) -> list[str]:
        return [d["status"] for d in self.of("status")]


async def follow_sse(http: httpx.AsyncClient, job_id: str, log: SseLog | None = None) -> SseLog:
    """Read a job's event stream until the server ends it (after the terminal status)."""
    log = log if log is not None else SseLog()
    event, data = "message", []
    async with http.stream(
        "GET", f"/api/v2/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}
    ) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                event = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:") :].strip())
            elif line == "" and data:
                log.events.append(SseEvent(event, json.loads("\n".join(data))))
                event, data = "message", []
    return log


async def comfy_saw_prompt(target: ComfyTarget, job_id: str) -> bool:
    """Whether any attempt of the job reached ComfyUI's POST /prompt (accepted or not)."""
    if target.standin is not None:
        return any((r.prompt_id or "").startswith(job_id) for r in target.standin.log.prompts)
    async with httpx.AsyncClient(base_url=target.url) as comfy:
        for attempt in (1, 2, 3):
            if (await comfy.get(f"/api/jobs/{prompt_id(job_id, attempt)}")).status_code != 404:
                return True
    return False


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def upload_asset(
    http: httpx.AsyncClient, data: bytes, *, filename: str, content_type: str
) -> dict[str, Any]:
    """Upload bytes as an asset; returns the ``info`` of a ``core/ASSET`` reference to it."""
    response = await http.post(
        "/api/v2/assets",
        files={"file": (filename, data, content_type)},
        data={"file_path": filename, "content_type": content_type},
    )
    assert response.status_code in (200, 201), response.text
    body = response.json()
    return {"id": body["id"], "hash": body.get("hash"), "file_path": filename}


def png_bytes(width: int = 8, height: int = 8, colour: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def load_image(image: object) -> dict[str, Any]:
    """LoadImage → ImageInvert → SaveImage with ``image`` as LoadImage's value, whatever it is."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "out"}},
    }


def node_error_types(details: dict[str, Any], node_id: str) -> list[str]:
    return [error["type"] for error in details.get("node_errors", {}).get(node_id, [])]


async def forget_catalog(runtime: Any) -> None:
    """Drop the node catalog the workers published, so submissions skip the catalog check and what
    the worker or ComfyUI does with a bad graph can be observed (as with a stale catalog)."""
    from comfyfleet.db.tables import node_catalogs

    async with runtime.engine.begin() as conn:
        await conn.execute(node_catalogs.delete())
    runtime.catalog_cache.invalidate()
