"""The stand-in server: an aiohttp app, one worker task, and helpers for tests driving it in-process."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from .config import Dirs, StandinConfig
from .control import HoldGate, StandinLog
from .executor import Executor
from .hub import Hub
from .prompt_queue import PromptQueue
from .routes import MAX_UPLOAD_SIZE, Routes, origin_guard


class Standin:
    """A ComfyUI 0.8.0 look-alike. Start it with :func:`run_standin` (tests) or ``python -m`` (processes)."""

    def __init__(
        self, dirs: Dirs, config: StandinConfig | None = None, *, argv: list[str] | None = None
    ) -> None:
        self.dirs = dirs
        self.config = config or StandinConfig()
        self.argv = argv or ["main.py"]
        self.log = StandinLog()
        self.hub = Hub()
        self.gate = HoldGate(self.config)
        self.queue = PromptQueue(on_change=self._queue_changed)
        self.executor = Executor(self.hub, dirs, self.config, self.gate)
        self.host = "127.0.0.1"
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._worker: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[origin_guard], client_max_size=MAX_UPLOAD_SIZE + 1024 * 1024)
        for method, path, handler in Routes(self).table():
            app.router.add_route(method, path, handler)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.dirs.create()
        _wipe(self.dirs.temp)  # ComfyUI empties temp/ at start and at exit
        self._runner = web.AppRunner(self.build_app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.host, self.port = host, int(self._runner.addresses[0][1])  # the bound port, also for port=0
        self._worker = asyncio.create_task(self._work(), name="standin-worker")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        await self.hub.close_all()
        if self._runner is not None:
            await self._runner.cleanup()
        _wipe(self.dirs.temp)

    async def _work(self) -> None:
        """The single worker: exactly one prompt at a time (main.py:198)."""
        while True:
            task_id, item = await self.queue.get()
            entry = await self.executor.execute(item)
            self.queue.task_done(task_id, entry)  # history written, then status
            if self.executor.client_id is not None:
                self.executor.send(
                    "executing", {"node": None, "prompt_id": item.prompt_id}, self.executor.client_id
                )
            self.executor.last_node_id = None

    # --- state -------------------------------------------------------------------------------------

    def exec_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.queue.remaining()}}

    def _queue_changed(self) -> None:
        self.hub.send("status", {"status": self.exec_info()})

    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)

    # --- for tests ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def ws_url(self, client_id: str | None = None) -> str:
        base = f"ws://{self.host}:{self.port}/ws"
        return f"{base}?clientId={client_id}" if client_id else base

    @property
    def input_dir(self) -> Path:
        return self.dirs.input

    @property
    def output_dir(self) -> Path:
        return self.dirs.output

    @property
    def temp_dir(self) -> Path:
        return self.dirs.temp

    def set_config(self, **changes: Any) -> None:
        self.config.update(changes)

    def hold(self, *class_types: str) -> None:
        """Park nodes of these classes before they run until :meth:`release` lets them go."""
        self.config.hold = set(self.config.hold) | set(class_types)

    async def release(self, count: int | None = None) -> None:
        await self.gate.release(count)

    async def wait_held(self, node_id: str | None = None, timeout: float = 10.0) -> str:
        return await self.gate.wait_held(node_id, timeout)

    async def drop_ws(self, client_id: str) -> bool:
        conn = self.hub.sockets.get(client_id)
        if conn is None:
            return False
        await conn.ws.close()
        return True


def _wipe(folder: Path) -> None:
    if folder.is_dir():
        for child in folder.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def make_dirs(
    root: Path,
    *,
    input_dir: Path | None = None,
    output_dir: Path | None = None,
    temp_dir: Path | None = None,
    user_dir: Path | None = None,
) -> Dirs:
    return Dirs(
        input=input_dir or root / "input",
        output=output_dir or root / "output",
        temp=temp_dir or root / "temp",
        user=user_dir or root / "user",
    )


@contextlib.asynccontextmanager
async def run_standin(
    tmp_dir: Path | str,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    input_dir: Path | None = None,
    output_dir: Path | None = None,
    temp_dir: Path | None = None,
    user_dir: Path | None = None,
    **knobs: Any,
) -> AsyncIterator[Standin]:
    """``async with run_standin(tmp_path) as standin:`` -- ``knobs`` are :class:`StandinConfig` fields."""
    dirs = make_dirs(
        Path(tmp_dir), input_dir=input_dir, output_dir=output_dir, temp_dir=temp_dir, user_dir=user_dir
    )
    config = StandinConfig()
    config.update(knobs)
    standin = Standin(dirs, config)
    await standin.start(host, port)
    try:
        yield standin
    finally:
        await standin.stop()
