"""The prompt queue: a priority heap of pending prompts, the running one, and the in-memory history."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_HISTORY = 10_000  # execution.py:1108


@dataclass
class QueueItem:
    number: float | int
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs_to_execute: list[str]
    # Secrets (auth_token_comfy_org, api_key_comfy_org) travel beside the item, never inside it.
    sensitive: dict[str, Any] = field(default_factory=dict)

    def wire(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs_to_execute]


class PromptQueue:
    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        # Heap entries compare like ComfyUI's tuples (number, prompt_id, ...); the sequence number only
        # breaks ties that would otherwise compare two prompt dicts.
        self._heap: list[tuple[float | int, str, int, QueueItem]] = []
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self.running: dict[int, QueueItem] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self._task_ids = itertools.count()

    def put(self, item: QueueItem) -> None:
        heapq.heappush(self._heap, (item.number, item.prompt_id, next(self._seq), item))
        self._wakeup.set()
        self._on_change()

    async def get(self) -> tuple[int, QueueItem]:
        while not self._heap:
            self._wakeup.clear()
            await self._wakeup.wait()
        item = heapq.heappop(self._heap)[3]
        task_id = next(self._task_ids)
        self.running[task_id] = item
        self._on_change()
        return task_id, item

    def task_done(self, task_id: int, entry: dict[str, Any]) -> None:
        item = self.running.pop(task_id)
        if len(self.history) >= MAX_HISTORY:
            self.history.pop(next(iter(self.history)))
        # A re-used prompt_id overwrites the earlier entry (transcript 11).
        self.history.pop(item.prompt_id, None)
        self.history[item.prompt_id] = entry
        self._on_change()

    @property
    def pending(self) -> list[QueueItem]:
        """The raw heap array, like GET /queue returns it (not necessarily sorted)."""
        return [entry[3] for entry in self._heap]

    def remaining(self) -> int:
        return len(self._heap) + len(self.running)

    def running_ids(self) -> list[str]:
        return [item.prompt_id for item in self.running.values()]

    def delete(self, prompt_id: str) -> bool:
        """Remove the first pending match; running and unknown ids are a silent no-op."""
        for index, entry in enumerate(self._heap):
            if entry[1] == prompt_id:
                self._heap.pop(index)
                heapq.heapify(self._heap)
                self._on_change()
                return True
        return False

    def wipe(self) -> None:
        self._heap.clear()
        self._on_change()
