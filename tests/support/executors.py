"""A test executor: each job waits until the test says how it ends. Drives the queue's lifecycle
without ComfyUI (the worker tests use the ComfyUI stand-in instead)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from comfyfleet.queue.executor import Canceled, JobContext, Outcome, Succeeded


@dataclass
class ScriptedExecutor:
    started: asyncio.Queue[JobContext] = field(default_factory=asyncio.Queue)
    outcomes: dict[str, asyncio.Future[Outcome]] = field(default_factory=dict)
    default: Outcome | None = None  # when set, jobs finish at once with it
    seen_cancel: list[str] = field(default_factory=list)

    def _future(self, job_id: str) -> asyncio.Future[Outcome]:
        if job_id not in self.outcomes:
            self.outcomes[job_id] = asyncio.get_running_loop().create_future()
        return self.outcomes[job_id]

    def finish(self, job_id: str, outcome: Outcome | None = None) -> None:
        future = self._future(job_id)
        if not future.done():
            future.set_result(outcome or Succeeded())

    async def execute(self, ctx: JobContext) -> Outcome:
        await self.started.put(ctx)
        if self.default is not None:
            return self.default
        future = self._future(ctx.job.id)
        cancel = asyncio.ensure_future(ctx.cancel_requested.wait())
        done, _ = await asyncio.wait({future, cancel}, return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            cancel.cancel()
            return future.result()
        self.seen_cancel.append(ctx.job.id)
        return Canceled()
