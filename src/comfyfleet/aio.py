"""Small asyncio helpers the service's loops share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def first_completed(*awaitables: Awaitable[Any]) -> None:
    """Wait until one of ``awaitables`` is done, then cancel and reap the others (e.g. a stop event
    against a wake-up notification)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
