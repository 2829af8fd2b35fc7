"""The NVIDIA MPS control daemon of one GPU (``MpsDaemon``).

With several slots on one GPU, an MPS control daemon per GPU lets their kernels share the GPU instead
of time-slicing it. Each daemon gets its own pipe and log folders, and its clients name the GPU by UUID
(``client_env``). ``start`` raises ``MpsUnavailable`` when the binary is missing or the daemon does not
come up; the supervisor then runs plain slots.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from comfyfleet.worker.comfy.process import log_tail

log = logging.getLogger(__name__)

MPS_CONTROL = "nvidia-cuda-mps-control"
NVIDIA_SMI = "nvidia-smi"


class MpsUnavailable(RuntimeError):
    """The MPS control daemon could not be started; the supervisor falls back to plain slots."""


class MpsDaemon:
    """The NVIDIA MPS control daemon of one GPU, with its own pipe and log folders."""

    def __init__(
        self,
        gpu: int,
        root: Path,
        *,
        control: str = MPS_CONTROL,
        nvidia_smi: str = NVIDIA_SMI,
        timeout: float = 15.0,
    ) -> None:
        self.gpu = gpu
        self.pipe_dir = root / f"gpu{gpu}" / "pipe"
        self.log_dir = root / f"gpu{gpu}" / "log"
        # The daemon remaps the devices it sees, so a client's CUDA_VISIBLE_DEVICES index would be
        # read against the remapped list; a GPU UUID means the same device to both (NVIDIA's advice).
        self.device = str(gpu)
        self._control = control
        self._nvidia_smi = nvidia_smi
        self._timeout = timeout

    def client_env(self) -> dict[str, str]:
        return {
            "CUDA_VISIBLE_DEVICES": self.device,
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir),
        }

    async def start(self) -> None:
        control = shutil.which(self._control)
        if control is None:
            raise MpsUnavailable(f"{self._control} not found")
        self.device = await self._gpu_uuid()
        self.pipe_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # -d forks the daemon; its output goes to a file because a pipe it inherits would stay open.
        code, output = await _run(
            [control, "-d"],
            env=self._env(),
            timeout=self._timeout,
            output_file=self.log_dir / "control-start.out",
        )
        if code != 0:
            raise MpsUnavailable(f"`{self._control} -d` for GPU {self.gpu} exited with {code}: {output}")
        code, output = await _run(
            [control], env=self._env(), stdin=b"get_server_list\n", timeout=self._timeout
        )
        if code != 0:
            raise MpsUnavailable(f"MPS control daemon for GPU {self.gpu} does not answer: {output}")
        log.info("MPS control daemon running for GPU %d (%s)", self.gpu, self.device)

    async def stop(self) -> None:
        control = shutil.which(self._control)
        if control is None:
            return
        code, output = await _run([control], env=self._env(), stdin=b"quit\n", timeout=self._timeout)
        if code != 0:
            log.warning("stopping the MPS control daemon of GPU %d: %s", self.gpu, output)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.client_env()}

    async def _gpu_uuid(self) -> str:
        smi = shutil.which(self._nvidia_smi)
        if smi is None:
            raise MpsUnavailable(f"{self._nvidia_smi} not found (needed to name GPU {self.gpu} by UUID)")
        code, output = await _run(
            [smi, "--query-gpu=uuid", "--format=csv,noheader", "-i", str(self.gpu)],
            env=dict(os.environ),
            timeout=self._timeout,
        )
        uuid = output.strip().splitlines()[0].strip() if output.strip() else ""
        if code != 0 or not uuid.startswith(("GPU-", "MIG-")):
            raise MpsUnavailable(f"cannot read the UUID of GPU {self.gpu}: {output.strip() or code}")
        return uuid


# ----------------------------------------------------------------------------------------- helpers


def _open_sink(path: Path) -> IO[bytes]:
    return path.open("wb")


async def _run(
    argv: list[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    stdin: bytes | None = None,
    output_file: Path | None = None,
) -> tuple[int, str]:
    """Run a short helper command; returns its exit code and output (or the output file's tail)."""
    sink = _open_sink(output_file) if output_file is not None else None
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=sink if sink is not None else asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    finally:
        if sink is not None:
            sink.close()
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"{argv[0]} did not finish within {timeout:g} s"
    text = out.decode(errors="replace") if out else ""
    if output_file is not None:
        text = log_tail(output_file)
    return proc.returncode if proc.returncode is not None else -1, text.strip()
