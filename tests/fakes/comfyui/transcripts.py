"""Loading the recorded ComfyUI 0.8.0 transcripts and comparing live traffic with them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHARED = Path("/work/shared/comfyui/transcripts")
LOCAL = Path(__file__).resolve().parents[1] / "transcripts"


def load(name: str) -> dict[str, Any]:
    """A transcript by file stem, e.g. ``"01_empty_image_save"``: the shared recording when this
    machine has it (the source of truth), else the copy kept in the repository."""
    for folder in (SHARED, LOCAL):
        path = folder / f"{name}.json"
        if path.is_file():
            data: dict[str, Any] = json.loads(path.read_text())
            return data
    raise FileNotFoundError(f"no transcript {name} in {SHARED} or {LOCAL}")


def flatten(ws_messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Recorded socket traffic in :class:`WsRecorder`'s shape; markers become ``{"kind": "marker"}``."""
    out: list[dict[str, Any]] = []
    for m in ws_messages:
        if m.get("dir") == "client->server":
            continue
        if m.get("kind") == "text":
            out.append({"kind": "text", "type": m["msg"]["type"], "data": m["msg"]["data"]})
        elif m.get("kind") == "binary":
            out.append({"kind": "binary", "binary": m["binary"]})
        elif m.get("kind") == "marker":
            out.append({"kind": "marker", "text": m["text"]})
    return out


def split_markers(messages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    phases: list[list[dict[str, Any]]] = [[]]
    for m in messages:
        if m["kind"] == "marker":
            phases.append([])
        else:
            phases[-1].append(m)
    return phases


def type_names(messages: list[dict[str, Any]], *, binary: bool = True) -> list[str]:
    names = []
    for m in messages:
        if m["kind"] == "binary":
            if binary:
                names.append("BIN")
        elif m["kind"] == "text":
            node_null = m["type"] == "executing" and m["data"].get("node") is None
            names.append("executing:null" if node_null else m["type"])
    return names


Messages = list[dict[str, Any]]


def of_prompt(messages: Messages, prompt_id: str, *, binary: bool = False) -> Messages:
    """Messages carrying this prompt_id; with ``binary``, also the frames (which carry none) sent
    between its first and last message."""
    own = [
        i for i, m in enumerate(messages) if m["kind"] == "text" and m["data"].get("prompt_id") == prompt_id
    ]
    if not own:
        return []
    return [
        m
        for i, m in enumerate(messages)
        if i in own or (binary and m["kind"] == "binary" and own[0] < i < own[-1])
    ]


def between(messages: list[dict[str, Any]], first: str, last: str) -> list[dict[str, Any]]:
    """From the first message of type ``first`` through the next of type ``last`` (both included)."""
    start = next(i for i, m in enumerate(messages) if m["kind"] == "text" and m["type"] == first)
    end = next(
        i
        for i in range(start + 1, len(messages))
        if messages[i]["kind"] == "text" and messages[i]["type"] == last
    )
    return messages[start : end + 1]


def node_block(messages: list[dict[str, Any]], node_id: str) -> list[dict[str, Any]]:
    """One node's messages: its running snapshot, executing, progress/previews, up to the snapshot
    that shows it finished."""
    start = next(
        i
        for i, m in enumerate(messages)
        if m["kind"] == "text" and m["type"] == "executing" and m["data"].get("node") == node_id
    )
    start -= 1  # the progress_state(running) that precedes `executing`
    end = next(
        i
        for i in range(start + 1, len(messages))
        if messages[i]["kind"] == "text"
        and messages[i]["type"] == "progress_state"
        and messages[i]["data"]["nodes"].get(node_id, {}).get("state") == "finished"
    )
    return messages[start : end + 1]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    return "object"


def assert_same_shape(recorded: Any, actual: Any, path: str = "$") -> None:
    """Same keys at every level and the same JSON types (int and float told apart); list items are
    compared pairwise up to the shorter length."""
    assert _kind(recorded) == _kind(actual), (
        f"{path}: recorded {_kind(recorded)} {recorded!r:.80}, got {actual!r:.80}"
    )
    if isinstance(recorded, dict):
        assert set(recorded) == set(actual), f"{path}: keys {sorted(recorded)} != {sorted(actual)}"
        for key in recorded:
            assert_same_shape(recorded[key], actual[key], f"{path}.{key}")
    elif isinstance(recorded, list):
        for index, (a, b) in enumerate(zip(recorded, actual, strict=False)):
            assert_same_shape(a, b, f"{path}[{index}]")


def assert_same_messages(
    recorded: list[dict[str, Any]], actual: list[dict[str, Any]], *, binary: bool = True
) -> None:
    """Same message types in the same order, each with the recorded payload shape."""
    if not binary:
        recorded = [m for m in recorded if m["kind"] != "binary"]
        actual = [m for m in actual if m["kind"] != "binary"]
    expected, got = type_names(recorded), type_names(actual)
    assert got == expected, f"\nrecorded: {expected}\nactual:   {got}"
    for index, (r, a) in enumerate(zip(recorded, actual, strict=True)):
        if r["kind"] == "text":
            assert_same_shape(r["data"], a["data"], f"message[{index}]<{r['type']}>")


def recorded_http(
    transcript: dict[str, Any], path: str, method: str = "GET", occurrence: int = 0
) -> dict[str, Any]:
    """The ``occurrence``-th recorded exchange whose path starts with ``path``."""
    found = [h for h in transcript["http_responses"] if h["method"] == method and h["path"].startswith(path)]
    exchange: dict[str, Any] = found[occurrence]
    return exchange
