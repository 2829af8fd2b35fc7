"""What comfyfleet adds to a trivial ComfyUI job, on SQLite and on PostgreSQL.

    .venv/bin/python -m bench.overhead [--jobs 200] [--cancels 30] [--comfyui-url http://127.0.0.1:8188]
                                       [--databases sqlite,postgres]

Without ``--comfyui-url`` it starts the ComfyUI stand-in of the tests (``python -m tests.fakes.comfyui``)
as a process of its own; with it, it drives that ComfyUI (which must be idle: the bench's jobs share
its queue). The service runs as ``comfyfleet serve`` in a process of its own (API, one worker slot,
reaper), the way it is deployed, so the figures include HTTP, the database and the process hop.

For each of ``--jobs`` rounds (EmptyImage 64x64 -> SaveImage, a new colour every time, so ComfyUI's
cache never answers) it measures, one after the other:

- direct: ``POST /prompt`` straight to ComfyUI -> the prompt's done marker (``executing`` with
  ``node: null``, sent after its history is written) on the bench's own WebSocket;
- through comfyfleet: ``POST /api/v2/jobs`` -> the terminal ``status`` event on the job's SSE stream,
  opened right after the 201;

and prints the median and p95 of the per-round difference (the time comfyfleet adds). Also:

- submit-to-running: the job's ``started_at - created_at`` (server clock, idle worker);
- cancel-to-interrupted: the cancel POST is sent -> the stand-in logged ``POST /interrupt`` for the
  job's prompt (its ``/__standin/log``; same host clock). A real ComfyUI keeps no such log and tells
  only the worker's socket about the interrupt, so there the end point is the prompt showing as
  ended in ``/api/jobs/{id}`` (polled every 5 ms): an upper bound that includes ComfyUI finishing the
  node it is in (ImageBlur at 1024x1024: about 0.4-0.8 s on a CPU, PROTOCOL.md section 4).

Aims (issue 4): <= 10 ms median added, <= 30 ms p95; submit-to-running <= 10 ms median;
cancel-to-interrupted <= 250 ms p95.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from tests.fakes.comfyui.process import standin_process as start_standin_process

from bench.common import cli, postgres_database, served, service_env

PLANS = {
    "bench": {
        "priority": 0,
        "max_running": 100,
        "max_queued": 100_000,
        "submit_rate": "1000000/minute",
        "read_rate": "100000000/minute",
    }
}
TERMINAL = {"succeeded", "failed", "canceled", "expired"}


def trivial(color: int, prefix: str = "bench") -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def slow(color: int, standin: bool) -> dict[str, Any]:
    """A job that stays running long enough to be canceled while ComfyUI works on it."""
    if standin:
        middle = {
            "class_type": "StandinSlowSampler",
            "inputs": {"image": ["1", 0], "steps": 10_000, "seconds_per_step": 0.01},
        }
        size = 64
    else:  # a real ComfyUI: a chain of large blurs (about 0.8 s per node on a CPU)
        middle = {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 10.0}}
        size = 1024
    graph: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": color},
        },
        "2": middle,
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench-slow"}},
    }
    if not standin:
        for n in range(4, 12):
            graph[str(n)] = {
                "class_type": "ImageBlur",
                "inputs": {"image": [str(n - 1 if n > 4 else 2), 0], "blur_radius": 31, "sigma": 10.0},
            }
        graph["3"]["inputs"]["images"] = ["11", 0]
    return graph


def stats(values_ms: list[float]) -> str:
    ordered = sorted(values_ms)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]  # nearest-rank percentile
    return f"median {statistics.median(ordered):7.2f} ms   p95 {p95:7.2f} ms   (n={len(ordered)})"


# ------------------------------------------------------------------------------------ ComfyUI


@contextlib.asynccontextmanager
async def standin_process(root: Path) -> AsyncIterator[str]:
    async with start_standin_process(root) as started:
        yield started.url


class DirectComfy:
    """The bench's own ComfyUI connection: one WebSocket, prompts submitted under its client id."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.client_id = f"bench-{uuid.uuid4().hex[:8]}"
        self.waiters: dict[str, asyncio.Future[float]] = {}
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ws = await self.session.ws_connect(
            f"{self.url.replace('http', 'ws', 1)}/ws?clientId={self.client_id}", max_msg_size=0
        )
        self.reader = asyncio.create_task(self._read(ws))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            now = time.perf_counter()
            data = json.loads(message.data)
            body = data.get("data") or {}
            prompt_id = str(body.get("prompt_id"))
            if data.get("type") == "executing" and body.get("node") is None and prompt_id in self.waiters:
                _resolve(self.waiters.pop(prompt_id), now)

    async def run(self, graph: dict[str, Any]) -> float:
        """Seconds from sending POST /prompt to the prompt's done marker."""
        prompt_id = uuid.uuid4().hex
        done = self.waiters[prompt_id] = asyncio.get_running_loop().create_future()
        start = time.perf_counter()
        async with self.session.post(
            f"{self.url}/prompt",
            json={
                "prompt": graph,
                "client_id": self.client_id,
                "prompt_id": prompt_id,
            },
        ) as response:
            assert response.status == 200, await response.text()
        return float(await asyncio.wait_for(done, 30)) - start


def _resolve(future: asyncio.Future[float], value: float) -> None:
    if not future.done():
        future.set_result(value)


# ------------------------------------------------------------------------------------ comfyfleet


@dataclass
class Client:
    session: aiohttp.ClientSession
    url: str
    headers: dict[str, str]

    async def submit(self, graph: dict[str, Any]) -> dict[str, Any]:
        async with self.session.post(
            f"{self.url}/api/v2/jobs", json={"workflow": graph}, headers=self.headers
        ) as response:
            body: dict[str, Any] = await response.json()
            assert response.status == 201, body
            return body

    async def get(self, job_id: str) -> dict[str, Any]:
        async with self.session.get(f"{self.url}/api/v2/jobs/{job_id}", headers=self.headers) as response:
            body: dict[str, Any] = await response.json()
            return body

    async def cancel(self, job_id: str) -> dict[str, Any]:
        async with self.session.post(
            f"{self.url}/api/v2/jobs/{job_id}/cancel", headers=self.headers
        ) as response:
            body: dict[str, Any] = await response.json()
            return body

    async def statuses(self, job_id: str) -> AsyncIterator[tuple[float, str]]:
        """(perf_counter, status) for each status event of the job's SSE stream, until terminal."""
        headers = {**self.headers, "Accept": "text/event-stream"}
        async with self.session.get(f"{self.url}/api/v2/jobs/{job_id}/events", headers=headers) as response:
            assert response.status == 200
            event = ""
            async for raw in response.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "status":
                    status = json.loads(line[5:])["status"]
                    yield time.perf_counter(), status
                    if status in TERMINAL:
                        return

    async def run(self, graph: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """Seconds from sending the submit to the terminal status on the job's SSE stream."""
        start = time.perf_counter()
        job = await self.submit(graph)
        end, status = await self.terminal(job["id"])
        assert status == "succeeded", (status, job["id"])
        return end - start, job

    async def terminal(self, job_id: str) -> tuple[float, str]:
        """(perf_counter, status) of the job's terminal status event on its SSE stream."""
        seen = (time.perf_counter(), "")
        async for event in self.statuses(job_id):
            seen = event
        return seen


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass
class Figures:
    added_ms: list[float] = field(default_factory=list)
    direct_ms: list[float] = field(default_factory=list)
    through_ms: list[float] = field(default_factory=list)
    to_running_ms: list[float] = field(default_factory=list)
    cancel_ms: list[float] = field(default_factory=list)


async def measure(client: Client, comfy: DirectComfy, jobs: int, cancels: int, standin: bool) -> Figures:
    figures = Figures()
    base = int(time.time()) % 1_000_000 * 7
    for n in range(5):  # warm up: connections, caches, the first claim
        await comfy.run(trivial(base + n))
        await client.run(trivial(base + 100 + n))
    for n in range(jobs):
        direct = await comfy.run(trivial((base + 1000 + 2 * n) % 16_777_215))
        through, job = await client.run(trivial((base + 1001 + 2 * n) % 16_777_215))
        body = await client.get(job["id"])
        figures.direct_ms.append(direct * 1000)
        figures.through_ms.append(through * 1000)
        figures.added_ms.append((through - direct) * 1000)
        started, created = _ts(body["started_at"]), _ts(body["created_at"])
        figures.to_running_ms.append((started - created).total_seconds() * 1000)
    for n in range(cancels):
        figures.cancel_ms.append(await cancel_once(client, comfy, base + 5000 + n, standin) * 1000)
    return figures


async def cancel_once(client: Client, comfy: DirectComfy, color: int, standin: bool) -> float:
    job = await client.submit(slow(color, standin))
    prompt_id = f"{job['id']}-1"  # the runner's prompt id for the first attempt
    deadline = time.monotonic() + 30
    while True:  # wait until ComfyUI works on it (a progress snapshot exists), not merely claimed
        body = await client.get(job["id"])
        progress = body.get("progress") or {}
        if progress.get("current_node") == "2" or (not standin and progress):
            break
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.01)
    wall, start = time.time(), time.perf_counter()
    answer = await client.cancel(job["id"])
    assert answer["status"] in ("canceling", "canceled"), answer
    if standin:
        while True:
            async with client.session.get(f"{comfy.url}/__standin/log") as response:
                log = await response.json()
            received = [i["received_at"] for i in log["interrupts"] if i["requested_prompt_id"] == prompt_id]
            if received:
                latency = float(received[0]) - wall
                break
            assert time.monotonic() < deadline + 30, "no interrupt reached the stand-in"
            await asyncio.sleep(0.01)
    else:
        # ComfyUI tells only the submitting socket (the worker's) about the interrupt, so watch
        # the prompt from outside: it ends "failed" in /api/jobs once the interrupt took effect.
        while True:
            async with client.session.get(f"{comfy.url}/api/jobs/{prompt_id}") as response:
                state = (await response.json()).get("status") if response.status == 200 else None
            if state in ("failed", "completed"):
                latency = time.perf_counter() - start
                break
            assert time.monotonic() < deadline + 60, f"ComfyUI still runs {prompt_id}"
            await asyncio.sleep(0.005)
    _, status = await client.terminal(job["id"])
    assert status == "canceled", status
    return latency


# ------------------------------------------------------------------------------------ main


@contextlib.asynccontextmanager
async def database(kind: str, data_dir: Path) -> AsyncIterator[str]:
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{data_dir / 'comfyfleet.db'}"
    else:
        async with postgres_database() as url:
            yield url


async def bench_database(kind: str, comfyui_url: str, jobs: int, cancels: int, standin: bool) -> Figures:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        async with database(kind, data_dir) as database_url:
            env = service_env(
                database_url,
                data_dir,
                COMFYFLEET_PLANS=json.dumps(PLANS),
                COMFYFLEET_COMFYUI_URL=comfyui_url,
                COMFYFLEET_WORKER_SLOTS="1",
                COMFYFLEET_AUTH_CACHE_TTL_S="30",
            )
            cli(env, "db", "upgrade")
            cli(env, "tenants", "create", "bench", "--plan", "bench")
            key = cli(env, "keys", "create", "bench")
            async with served(env, "serve") as url, aiohttp.ClientSession() as session:
                comfy = DirectComfy(session, comfyui_url)
                await comfy.start()
                client = Client(session, url, {"Authorization": f"Bearer {key}"})
                try:
                    return await measure(client, comfy, jobs, cancels, standin)
                finally:
                    if comfy.reader is not None:
                        comfy.reader.cancel()


async def main(args: argparse.Namespace) -> None:
    kinds = [k.strip() for k in args.databases.split(",") if k.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        async with contextlib.AsyncExitStack() as stack:
            standin = args.comfyui_url is None
            url = args.comfyui_url or await stack.enter_async_context(standin_process(Path(tmp)))
            target = "the ComfyUI stand-in (process)" if standin else f"ComfyUI at {url}"
            print(
                f"comfyfleet overhead: {args.jobs} sequential trivial jobs (EmptyImage 64x64 -> SaveImage) "
                f"against {target};\nservice: `comfyfleet serve` subprocess, 1 worker slot; client sees the "
                f"terminal status on the job's SSE stream"
            )
            for kind in kinds:
                figures = await bench_database(kind, url, args.jobs, args.cancels, standin)
                print(f"\n[{kind}]")
                print(f"  direct to ComfyUI (POST /prompt -> done marker)  {stats(figures.direct_ms)}")
                print(f"  through comfyfleet (submit -> SSE terminal)      {stats(figures.through_ms)}")
                print(
                    f"  added by comfyfleet (paired difference)          {stats(figures.added_ms)}"
                    "   aim: median <= 10, p95 <= 30"
                )
                print(
                    f"  submit-to-running (started_at - created_at)      {stats(figures.to_running_ms)}"
                    "   aim: median <= 10"
                )
                end = "stand-in got POST /interrupt" if standin else "ComfyUI ended the prompt"
                print(
                    f"  cancel-to-interrupted (cancel POST -> {end})  {stats(figures.cancel_ms)}"
                    "   aim: p95 <= 250"
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--cancels", type=int, default=30)
    parser.add_argument("--comfyui-url", default=None, help="a real ComfyUI (default: start the stand-in)")
    parser.add_argument("--databases", default="sqlite,postgres")
    asyncio.run(main(parser.parse_args()))
