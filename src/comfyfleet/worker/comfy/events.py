"""Typed events of one ComfyUI prompt, as :meth:`ComfyClient.follow` yields them.

Each maps one WebSocket message of ComfyUI 0.8.0 (PROTOCOL.md section 3), except :class:`Lost`
and :class:`Done`, which the client adds:

    Started -> Cached -> (ProgressState | Executing | Progress | Preview | Executed)*
      -> Succeeded | Failed | Interrupted | Lost -> Done

``Done`` always comes last, exactly once, after one terminal event. Events of a prompt whose
socket dropped are lost on the wire; the client then rebuilds the outcome from ``/history`` and
marks ``Done.recovered``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

PreviewFormat = Literal["JPEG", "PNG"]
Outcome = Literal["success", "error", "interrupted", "lost"]


@dataclass(frozen=True, slots=True)
class Started:
    prompt_id: str
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class Cached:
    """Nodes whose outputs come from ComfyUI's cache; they will not run."""

    prompt_id: str
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Executing:
    prompt_id: str
    node: str
    display_node: str | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    """Step progress of one node (samplers: one per step)."""

    prompt_id: str
    node: str
    value: float
    max: float


@dataclass(frozen=True, slots=True)
class NodeProgress:
    node_id: str
    value: float
    max: float
    state: str  # "running" | "finished"


@dataclass(frozen=True, slots=True)
class ProgressState:
    """Cumulative snapshot of every node that started so far in this prompt."""

    prompt_id: str
    nodes: Mapping[str, NodeProgress]


@dataclass(frozen=True, slots=True)
class Preview:
    prompt_id: str
    node_id: str | None
    image: bytes
    format: PreviewFormat


@dataclass(frozen=True, slots=True)
class Executed:
    """UI output of an output node, e.g. ``{"images": [{"filename", "subfolder", "type"}]}``."""

    prompt_id: str
    node: str
    output: Mapping[str, Any]
    display_node: str | None = None


@dataclass(frozen=True, slots=True)
class Succeeded:
    prompt_id: str
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """A node raised: the whole prompt stopped (other branches do not run)."""

    prompt_id: str
    node_id: str | None
    node_type: str | None
    exception_type: str
    exception_message: str
    traceback: tuple[str, ...] = ()
    executed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Interrupted:
    prompt_id: str
    node_id: str | None
    node_type: str | None
    executed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Lost:
    """The server does not know the prompt any more: deleted from the queue, or ComfyUI restarted
    (history lives in memory only)."""

    prompt_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class OutputFile:
    node_id: str
    media: str  # the key in the node's output, e.g. "images"
    filename: str
    subfolder: str
    type: str  # "output" | "temp" | "input"


@dataclass(frozen=True, slots=True)
class Done:
    """Last event of a prompt. ``outputs`` maps node id to UI output (from history when ``recovered``)."""

    prompt_id: str
    outcome: Outcome
    outputs: Mapping[str, Any] = field(default_factory=dict)
    recovered: bool = False

    def files(self) -> list[OutputFile]:
        return list(iter_output_files(self.outputs))


TerminalEvent = Succeeded | Failed | Interrupted | Lost
ComfyEvent = (
    Started
    | Cached
    | Executing
    | Progress
    | ProgressState
    | Preview
    | Executed
    | Succeeded
    | Failed
    | Interrupted
    | Lost
    | Done
)


def iter_output_files(outputs: Mapping[str, Any]) -> Iterator[OutputFile]:
    """Every file a prompt's UI outputs point at, in node order."""
    for node_id, ui in outputs.items():
        if not isinstance(ui, Mapping):
            continue
        for media, items in ui.items():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, Mapping) and "filename" in item:
                    yield OutputFile(
                        node_id=str(node_id),
                        media=str(media),
                        filename=str(item["filename"]),
                        subfolder=str(item.get("subfolder", "")),
                        type=str(item.get("type", "output")),
                    )


def outcome_of(event: TerminalEvent) -> Outcome:
    if isinstance(event, Succeeded):
        return "success"
    if isinstance(event, Failed):
        return "error"
    if isinstance(event, Interrupted):
        return "interrupted"
    return "lost"


# --- wire -> events --------------------------------------------------------------------------------

PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4
_FORMATS: dict[int, PreviewFormat] = {1: "JPEG", 2: "PNG"}


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list | tuple) else ()


def _failed(prompt_id: str, data: Mapping[str, Any]) -> Failed:
    return Failed(
        prompt_id=prompt_id,
        node_id=_str_or_none(data.get("node_id")),
        node_type=_str_or_none(data.get("node_type")),
        exception_type=str(data.get("exception_type", "")),
        exception_message=str(data.get("exception_message", "")),
        traceback=_strings(data.get("traceback")),
        executed=_strings(data.get("executed")),
    )


def _interrupted(prompt_id: str, data: Mapping[str, Any]) -> Interrupted:
    return Interrupted(
        prompt_id=prompt_id,
        node_id=_str_or_none(data.get("node_id")),
        node_type=_str_or_none(data.get("node_type")),
        executed=_strings(data.get("executed")),
    )


def _progress_state(prompt_id: str, data: Mapping[str, Any]) -> ProgressState:
    nodes: dict[str, NodeProgress] = {}
    raw = data.get("nodes")
    if isinstance(raw, Mapping):
        for node_id, entry in raw.items():
            if isinstance(entry, Mapping):
                nodes[str(node_id)] = NodeProgress(
                    node_id=str(node_id),
                    value=float(entry.get("value", 0)),
                    max=float(entry.get("max", 1)),
                    state=str(entry.get("state", "")),
                )
    return ProgressState(prompt_id=prompt_id, nodes=nodes)


def event_from_message(kind: str, data: Mapping[str, Any], prompt_id: str) -> ComfyEvent | None:
    """The event for one prompt-scoped text message; None for messages that are not events
    (``status``, ``feature_flags``, the ``executing{node: null}`` done marker, unknown types)."""
    if kind == "execution_start":
        return Started(prompt_id, data.get("timestamp"))
    if kind == "execution_cached":
        return Cached(prompt_id, _strings(data.get("nodes")))
    if kind == "executing":
        node = data.get("node")
        return (
            None if node is None else Executing(prompt_id, str(node), _str_or_none(data.get("display_node")))
        )
    if kind == "progress":
        return Progress(
            prompt_id, str(data.get("node")), float(data.get("value", 0)), float(data.get("max", 1))
        )
    if kind == "progress_state":
        return _progress_state(prompt_id, data)
    if kind == "executed":
        output = data.get("output")
        return Executed(
            prompt_id,
            str(data.get("node")),
            output if isinstance(output, Mapping) else {},
            _str_or_none(data.get("display_node")),
        )
    if kind == "execution_success":
        return Succeeded(prompt_id, data.get("timestamp"))
    if kind == "execution_error":
        return _failed(prompt_id, data)
    if kind == "execution_interrupted":
        return _interrupted(prompt_id, data)
    return None


@dataclass(frozen=True, slots=True)
class PreviewFrame:
    """A decoded binary frame; ``prompt_id`` is only known for type 4 (negotiated metadata)."""

    prompt_id: str | None
    node_id: str | None
    image: bytes
    format: PreviewFormat


def parse_preview_frame(frame: bytes) -> PreviewFrame | None:
    """Decode a binary WebSocket frame; None for types that are not images (3 = text, 2 = internal)."""
    if len(frame) < 8:
        return None
    kind = int.from_bytes(frame[0:4], "big")
    if kind == PREVIEW_IMAGE:
        fmt = _FORMATS.get(int.from_bytes(frame[4:8], "big"), "JPEG")
        return PreviewFrame(None, None, frame[8:], fmt)
    if kind == PREVIEW_IMAGE_WITH_METADATA:
        size = int.from_bytes(frame[4:8], "big")
        meta = json.loads(frame[8 : 8 + size])
        fmt = "PNG" if "png" in str(meta.get("image_type", "")).lower() else "JPEG"
        return PreviewFrame(
            _str_or_none(meta.get("prompt_id")), _str_or_none(meta.get("node_id")), frame[8 + size :], fmt
        )
    return None


def terminal_from_history(prompt_id: str, entry: Mapping[str, Any]) -> TerminalEvent:
    """The terminal event recorded in a history entry's ``status.messages``."""
    status = entry.get("status")
    status = status if isinstance(status, Mapping) else {}
    for item in reversed(status.get("messages") or []):
        if not (isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[1], Mapping)):
            continue
        kind, data = item
        if kind == "execution_success":
            return Succeeded(prompt_id, data.get("timestamp"))
        if kind == "execution_error":
            return _failed(prompt_id, data)
        if kind == "execution_interrupted":
            return _interrupted(prompt_id, data)
    if status.get("status_str") == "success":
        return Succeeded(prompt_id)
    return Failed(
        prompt_id,
        None,
        None,
        "unknown",
        f"history status {status.get('status_str')!r} without a terminal message",
    )
