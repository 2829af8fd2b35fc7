"""Directories and run-time knobs of the stand-in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Dirs:
    input: Path
    output: Path
    temp: Path
    user: Path

    def by_type(self, kind: str | None) -> Path | None:
        """ComfyUI's folder for ``type=input|output|temp`` (None for anything else)."""
        return {"input": self.input, "output": self.output, "temp": self.temp}.get(kind or "")

    def create(self) -> None:
        for path in (self.input, self.output, self.temp, self.user):
            path.mkdir(parents=True, exist_ok=True)


@dataclass
class StandinConfig:
    """Knobs a test may change while the server runs (``POST /__standin/config``).

    ``node_delay`` / ``node_delays`` make nodes take time the way a long ComfyUI node does: the
    interrupt flag is not polled while the node works, so an interrupt lands at the next node start.
    ``hold`` lists class types that wait for a release token (``Standin.release``) before they run:
    tests use it to park a prompt on a known node without relying on timing.
    """

    node_delay: float = 0.0
    node_delays: dict[str, float] = field(default_factory=dict)
    preview_method: str = "none"
    disable_metadata: bool = False
    hold: set[str] = field(default_factory=set)

    def delay_for(self, class_type: str) -> float:
        return float(self.node_delays.get(class_type, self.node_delay))

    def to_json(self) -> dict[str, Any]:
        return {
            "node_delay": self.node_delay,
            "node_delays": dict(self.node_delays),
            "preview_method": self.preview_method,
            "disable_metadata": self.disable_metadata,
            "hold": sorted(self.hold),
        }

    def update(self, data: dict[str, Any]) -> None:
        """Apply a partial update; unknown keys raise so a typo in a test fails loudly."""
        unknown = set(data) - set(self.to_json())
        if unknown:
            raise ValueError(f"unknown stand-in config keys: {sorted(unknown)}")
        if "node_delay" in data:
            self.node_delay = float(data["node_delay"])
        if "node_delays" in data:
            self.node_delays = {str(k): float(v) for k, v in dict(data["node_delays"]).items()}
        if "preview_method" in data:
            self.preview_method = str(data["preview_method"])
        if "disable_metadata" in data:
            self.disable_metadata = bool(data["disable_metadata"])
        if "hold" in data:
            self.hold = {str(x) for x in data["hold"]}
