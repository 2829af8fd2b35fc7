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

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

pytest.register_assert_rewrite("tests.fakes.comfyui.transcripts")

from tests.fakes.comfyui import Standin, run_standin  # noqa: E402
from tests.fakes.comfyui.process import StandinProcess  # noqa: E402
from tests.fakes.comfyui.process import standin_process as start_standin_process  # noqa: E402

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


@pytest_asyncio.fixture
async def standin_process(tmp_path: Path) -> AsyncIterator[StandinProcess]:
    # "--cpu" is a ComfyUI flag the stand-in ignores.
    async with start_standin_process(tmp_path / "comfyui-process", "--cpu", timeout=20) as started:
        yield started
