"""A real comfyfleet server on a loopback port inside the test's event loop (uvicorn), for clients
that speak HTTP themselves: the official comfy-sdk, SSE readers, the benchmarks' shapes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from comfyfleet.api.app import create_app
from comfyfleet.runtime import Runtime


@dataclass
class LiveServer:
    url: str
    app: FastAPI
    runtime: Runtime


@contextlib.asynccontextmanager
async def live_server(runtime: Runtime, *, background: bool = True) -> AsyncIterator[LiveServer]:
    app = create_app(runtime.settings, runtime=runtime, background=background)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", loop="none")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    runtime.settings.public_base_url = url  # absolute links must reach this server
    try:
        yield LiveServer(url=url, app=app, runtime=runtime)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
