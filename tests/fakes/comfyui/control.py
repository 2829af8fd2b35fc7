"""Test-only controls: what the stand-in received (``/__standin/log``) and the hold gate."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import StandinConfig


@dataclass
class PromptRecord:
    prompt_id: str | None
    number: float | int | None
    client_id: str | None
    accepted: bool
    error_type: str | None
    received_at: float = field(default_factory=time.time)


@dataclass
class InterruptRecord:
    requested_prompt_id: str | None  # None: a global interrupt
    running_prompt_id: str | None  # what ran when the request arrived
    flag_set: bool  # False when a targeted interrupt did not match the running prompt
    stopped_prompt_id: str | None = None  # filled in when the flag actually stopped a prompt
    received_at: float = field(default_factory=time.time)


@dataclass
class DeleteRecord:
    prompt_id: str
    removed: bool
    received_at: float = field(default_factory=time.time)


@dataclass
class StandinLog:
    prompts: list[PromptRecord] = field(default_factory=list)
    interrupts: list[InterruptRecord] = field(default_factory=list)
    deletes: list[DeleteRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "prompts": [asdict(r) for r in self.prompts],
            "interrupts": [asdict(r) for r in self.interrupts],
            "deletes": [asdict(r) for r in self.deletes],
        }

    def clear(self) -> None:
        self.prompts.clear()
        self.interrupts.clear()
        self.deletes.clear()


class HoldGate:
    """Parks nodes whose class is in ``config.hold`` until a test releases them, one token per node.

    A parked node already sent ``executing`` and does not poll the interrupt flag, like a long node.
    """

    def __init__(self, config: StandinConfig) -> None:
        self._config = config
        self._tokens = 0
        self._changed = asyncio.Condition()
        self.held_node: str | None = None

    async def pass_through(self, class_type: str, node_id: str) -> None:
        async with self._changed:
            if class_type not in self._config.hold:
                return
            self.held_node = node_id
            self._changed.notify_all()
            try:
                await self._changed.wait_for(lambda: self._tokens > 0 or class_type not in self._config.hold)
                if class_type in self._config.hold:
                    self._tokens -= 1
            finally:
                self.held_node = None
                self._changed.notify_all()

    async def release(self, count: int | None = None) -> None:
        """Let ``count`` held nodes through; ``None`` ends holding altogether."""
        async with self._changed:
            if count is None:
                self._config.hold = set()
            else:
                self._tokens += count
            self._changed.notify_all()

    async def wait_held(self, node_id: str | None = None, timeout: float = 10.0) -> str:
        """Wait until a node (any, or ``node_id``) is parked; returns its id."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(
                lambda: self.held_node is not None and (node_id is None or self.held_node == node_id)
            )
            assert self.held_node is not None
            return self.held_node

    async def notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
