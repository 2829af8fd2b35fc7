"""Pytest plugin (``pytest_plugins = ["tests.fakes.fixtures"]``): a ComfyUI for tests.

- ``comfyui_target`` / ``comfyui_url``: a real ComfyUI when ``COMFYFLEET_TEST_COMFYUI_URL`` is set,
  else a fresh in-process stand-in. Client and worker tests use these so they can be pointed at
  the real thing.
- ``comfyui_standin``: the stand-in behind ``comfyui_target``; skips the test against a real ComfyUI
  (for tests that need stand-in knobs: hold, delays, log).
- ``standin``: always a fresh stand-in (tests *of* the stand-in).
- ``standin_process``: the stand-in as a separate process started like ComfyUI's main.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

pytest.register_assert_rewrite("tests.fakes.comfyui.transcripts")

from tests.fakes.comfyui import Standin, run_standin  # noqa: E402

COMFYUI_URL_ENV = "COMFYFLEET_TEST_COMFYUI_URL"
REPO_ROOT = Path(__file__).resolve().parents[2]
# The stand-in's ImageBlur is fast; this makes blur chains slow enough to interrupt or to queue
# behind, as they are on a real ComfyUI (about 0.75 s per 1024x1024 node on a CPU).
STANDIN_BLUR_SECONDS = 0.1


@dataclass(frozen=True)
class ComfyTarget:
    url: str
    standin: Standin | None

    @property
    def is_real(self) -> bool:
        return self.standin is None

    def require_standin(self, why: str = "needs the stand-in's test knobs") -> Standin:
        if self.standin is None:
            pytest.skip(f"{why}; {COMFYUI_URL_ENV} points at a real ComfyUI")
        return self.standin


@pytest_asyncio.fixture
async def comfyui_target(tmp_path: Path) -> AsyncIterator[ComfyTarget]:
    real = os.environ.get(COMFYUI_URL_ENV, "").strip()
    if real:
        yield ComfyTarget(url=real.rstrip("/"), standin=None)
        return
    async with run_standin(tmp_path / "comfyui", node_delays={"ImageBlur": STANDIN_BLUR_SECONDS}) as standin:
        yield ComfyTarget(url=standin.url, standin=standin)


@pytest.fixture
def comfyui_url(comfyui_target: ComfyTarget) -> str:
    return comfyui_target.url


@pytest.fixture
def comfyui_standin(comfyui_target: ComfyTarget) -> Standin:
    return comfyui_target.require_standin()


@pytest_asyncio.fixture
async def standin(tmp_path: Path) -> AsyncIterator[Standin]:
    async with run_standin(tmp_path / "standin") as server:
        yield server


@dataclass(frozen=True)
class StandinProcess:
    url: str
    root: Path
    process: asyncio.subprocess.Process


@pytest_asyncio.fixture
async def standin_process(tmp_path: Path) -> AsyncIterator[StandinProcess]:
    root = tmp_path / "comfyui-process"
    args = [
        "-m",
        "tests.fakes.comfyui",
        "--listen",
        "127.0.0.1",
        "--port",
        "0",
        "--input-directory",
        str(root / "input"),
        "--output-directory",
        str(root / "output"),
        "--temp-directory",
        str(root),
        "--cpu",  # a ComfyUI flag the stand-in ignores
    ]
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args, cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            while True:
                line = (await process.stdout.readline()).decode()
                if not line:
                    raise RuntimeError("stand-in process exited before serving")
                match = re.search(r"To see the GUI go to: (\S+)", line)
                if match:
                    break
        yield StandinProcess(url=match.group(1), root=root, process=process)
    finally:
        if process.returncode is None:
            process.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
