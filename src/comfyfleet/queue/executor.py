"""The seam between the queue and what runs a job. The worker loop claims a job and calls a
``JobExecutor`` with a ``JobContext``; the executor answers with an ``Outcome``. The ComfyUI runner
(worker/runner.py) is the production executor; tests plug in their own."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

from comfyfleet.jobs.repository import JobRow


@dataclass(frozen=True)
class Succeeded:
    pass


@dataclass(frozen=True)
class Failed:
    code: str
    message: str
    node_id: str | None = None
    class_type: str | None = None
    traceback: str | None = None
    details: dict[str, Any] | None = None


@dataclass(frozen=True)
class Canceled:
    pass


@dataclass(frozen=True)
class Retry:
    """The job may run again elsewhere (dead ComfyUI, lost storage); counts against its attempts."""

    reason: str


Outcome = Succeeded | Failed | Canceled | Retry


class ProgressSink(Protocol):
    async def __call__(self, progress: dict[str, Any]) -> None: ...


@dataclass
class JobContext:
    job: JobRow
    worker: str
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when the lease is gone (the reaper took the job back): stop without writing anything.
    lease_lost: asyncio.Event = field(default_factory=asyncio.Event)
    report_progress: ProgressSink | None = None
    publish: Any = None  # async (kind, payload) -> None: live events (preview, output) for SSE


class JobExecutor(Protocol):
    async def execute(self, ctx: JobContext) -> Outcome: ...
