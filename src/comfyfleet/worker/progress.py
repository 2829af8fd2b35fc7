"""The contract's progress snapshot, computed from ComfyUI's events: node counts weighted with
sampler steps (value, nodes_done/nodes_total, current node and class, step/steps, message)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from comfyfleet.worker.comfy import events as ev


@dataclass
class ProgressTracker:
    classes: dict[str, str]  # node id -> class_type of the submitted prompt
    done: set[str] = field(default_factory=set)
    current: str | None = None
    step: int | None = None
    steps: int | None = None

    @property
    def total(self) -> int:
        return max(1, len(self.classes))

    def apply(self, event: ev.ComfyEvent) -> dict[str, Any] | None:
        """The new snapshot after ``event``, or None when the event changes nothing visible."""
        if isinstance(event, ev.Cached):
            self.done.update(event.nodes)
        elif isinstance(event, ev.Executing):
            if self.current is not None and self.current != event.node:
                self.done.add(self.current)
            self.current, self.step, self.steps = event.node, None, None
        elif isinstance(event, ev.Progress):
            self.current = event.node
            self.step, self.steps = int(event.value), int(event.max)
        elif isinstance(event, ev.ProgressState):
            self.done.update(n for n, p in event.nodes.items() if p.state == "finished")
        elif isinstance(event, ev.Executed):
            self.done.add(event.node)
        elif isinstance(event, ev.Succeeded):
            self.done.update(self.classes)
            self.current, self.step, self.steps = None, None, None
        else:
            return None
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        done = len(self.done & set(self.classes))
        fraction = done / self.total
        running = self.current is not None and self.current not in self.done
        if running and self.step is not None and self.steps:
            fraction += (self.step / self.steps) / self.total
        # A node that finished is no longer current; the message follows, so the snapshots of a
        # prompt's last events (executed, progress_state, success) are equal and written once.
        current = self.current if self.current not in self.done else None
        current_class = self.classes.get(current) if current else None
        message = None
        if current_class and self.steps:
            message = f"{current_class} {self.step}/{self.steps}"
        elif current_class:
            message = current_class
        return {
            "value": round(min(1.0, fraction), 4),
            "nodes_done": done,
            "nodes_total": len(self.classes),
            "current_node": current,
            "current_node_class": current_class,
            "step": self.step,
            "steps": self.steps,
            "message": message,
        }
