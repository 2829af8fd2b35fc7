"""One ComfyUI slot of a worker host, and what it reports.

``SlotSpec`` is everything that sets a slot apart from its neighbours: its port, its
input/output/temp/user folders, its SQLite database (``--database-url``; ComfyUI 0.8.0 otherwise puts
the database of every process started from one install at the same path inside that install), its
environment and its command line. ``SlotStatus`` is the state a slot reports (``/readyz`` shows it),
and ``notify_slot_lost`` runs the worker's callback when a slot lost its jobs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

SlotState = Literal["stopped", "starting", "ready", "unhealthy", "restarting", "failed"]
SlotLostCallback = Callable[["SlotSpec"], Awaitable[None] | None]

LISTEN_HOST = "127.0.0.1"


@dataclass(frozen=True)
class SlotSpec:
    """Everything that makes one ComfyUI process different from its neighbours."""

    index: int
    gpu: int | None
    port: int
    base_dir: Path
    env: Mapping[str, str] = field(default_factory=dict, hash=False)
    extra_args: tuple[str, ...] = ()

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def temp_dir(self) -> Path:
        return self.base_dir / "temp"

    @property
    def user_dir(self) -> Path:
        return self.base_dir / "user"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.user_dir / 'comfyui.db'}"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "comfyui.log"

    @property
    def url(self) -> str:
        return f"http://{LISTEN_HOST}:{self.port}"

    def argv(self, python: str, install_dir: Path) -> list[str]:
        return [
            python,
            str(install_dir / "main.py"),
            "--listen",
            LISTEN_HOST,
            "--port",
            str(self.port),
            "--input-directory",
            str(self.input_dir),
            "--output-directory",
            str(self.output_dir),
            "--temp-directory",
            str(self.temp_dir),
            "--user-directory",
            str(self.user_dir),
            "--database-url",
            self.database_url,
            "--disable-auto-launch",
            *self.extra_args,
        ]

    def create_dirs(self) -> None:
        for folder in (self.input_dir, self.output_dir, self.temp_dir, self.user_dir):
            folder.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class SlotStatus:
    index: int
    gpu: int | None
    url: str
    state: SlotState
    pid: int | None
    restarts: int
    last_error: str | None

    @property
    def ready(self) -> bool:
        return self.state == "ready"


async def notify_slot_lost(callback: SlotLostCallback | None, spec: SlotSpec) -> None:
    """Run the worker's callback; its failure must not stop the restart."""
    if callback is None:
        return
    try:
        result = callback(spec)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("on_slot_lost failed for slot %d", spec.index)
