"""The stand-in as a process of its own, started with ComfyUI's flags (the fixture and the benchmark
both start it this way)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class StandinProcess:
    url: str
    root: Path
    process: asyncio.subprocess.Process


@contextlib.asynccontextmanager
async def standin_process(
    root: Path, *extra_args: str, timeout: float = 30.0
) -> AsyncIterator[StandinProcess]:
    """``python -m tests.fakes.comfyui`` with its folders under ``root`` and a free port; yields once it
    serves (it prints ComfyUI's "To see the GUI go to: URL" line), stops it on exit."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
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
        *extra_args,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    drain: asyncio.Task[None] | None = None
    try:
        assert process.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = (await process.stdout.readline()).decode()
                if not line:
                    raise RuntimeError("the ComfyUI stand-in exited before serving")
                if match := re.search(r"To see the GUI go to: (\S+)", line):
                    break
        # Keep reading its output: a full pipe would block the stand-in.
        drain = asyncio.create_task(_drain(process.stdout))
        yield StandinProcess(url=match.group(1), root=root, process=process)
    finally:
        if drain is not None:
            drain.cancel()
        if process.returncode is None:
            process.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass
