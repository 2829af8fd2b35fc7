"""What runs beside the API in one process: local worker loops, the reaper, the webhook sender.
``comfyfleet serve`` starts all that the settings ask for; ``comfyfleet api`` none of them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from comfyfleet.queue.executor import JobExecutor
from comfyfleet.queue.reaper import run_reaper
from comfyfleet.queue.worker_loop import WorkerLoop
from comfyfleet.runtime import Runtime
from comfyfleet.webhooks.sender import run_sender

log = logging.getLogger(__name__)

NO_COMFYUI_HELP = (
    "No ComfyUI configured, so jobs will wait in the queue. Attach one with --comfyui-url "
    "http://127.0.0.1:8188 (COMFYFLEET_COMFYUI_URL), or let comfyfleet start one with --comfyui-dir "
    "/path/to/ComfyUI (COMFYFLEET_COMFYUI_DIR). To install ComfyUI on a machine with internet access: "
    "`pip install comfy-cli && comfy --workspace ./ComfyUI install` (add --cpu without a GPU)."
)

ServiceStarter = Callable[[Runtime, asyncio.Event], Awaitable[None]]


class BackgroundServices:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.stop_event = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.workers: list[WorkerLoop] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []

    async def start(self) -> None:
        runtime, settings = self.runtime, self.runtime.settings
        self._spawn("reaper", run_reaper(runtime, self.stop_event))
        self._spawn("webhook-sender", run_sender(runtime, self.stop_event))
        for name, service in runtime.extras.get("services", {}).items():
            self._spawn(name, service(runtime, self.stop_event))
        if settings.dispatch == "local":
            executors = await self._local_executors()
            for index, executor in enumerate(executors):
                loop = WorkerLoop(runtime, executor, name=f"{_hostname()}-{index}")
                self.workers.append(loop)
                self._spawn(f"worker-{index}", loop.run(self.stop_event))
        elif settings.dispatch == "modal":
            from comfyfleet.deploy.dispatch import run_modal_dispatcher

            self._spawn("modal-dispatch", run_modal_dispatcher(runtime, self.stop_event))

    async def _local_executors(self) -> list[JobExecutor]:
        runtime, settings = self.runtime, self.runtime.settings
        provided = runtime.extras.get("executors")
        if provided is not None:
            return list(provided)
        if settings.comfyui_url is None and settings.comfyui_dir is None:
            log.warning(NO_COMFYUI_HELP)
            return []
        from comfyfleet.worker.local import start_local_workers

        executors, close = await start_local_workers(runtime)
        self._closers.append(close)
        return executors

    def _spawn(self, name: str, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self.tasks.append(task)

    async def stop(self) -> None:
        self.stop_event.set()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks.clear()
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                await close()


def _hostname() -> str:
    import os
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"
