from __future__ import annotations

import asyncio, logging, random, io
from datetime import datetime

from tests.integration.worker.conftest import StartService
from tests.integration.worker.helpers import slow_sampler


async def test_debug(start_service: StartService, comfyui_standin: object, caplog) -> None:
    caplog.set_level(logging.INFO, logger="comfyfleet")
    service = await start_service(worker_slots=2)
    jobs = service.jobs
    rng = random.Random()
    for index in range(200):
        job = await jobs.submit(slow_sampler(steps=2, seconds_per_step=0.01, color=100 + index))
        await asyncio.sleep(rng.uniform(0, 0.08))
        answer = await jobs.cancel(job["id"])
        try:
            final = await jobs.wait_terminal(job["id"], timeout=5)
        except AssertionError:
            for t in asyncio.all_tasks():
                buf = io.StringIO()
                t.print_stack(file=buf)
                print("TASK", t.get_name(), buf.getvalue())
            for r in caplog.records:
                print("LOG", r.name, r.levelname, r.getMessage(), r.exc_text)
            raise
