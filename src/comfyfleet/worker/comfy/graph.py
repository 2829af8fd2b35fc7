"""API-format ComfyUI graphs: shape checks and ``core/ASSET`` references. Pure functions, no I/O.

A graph maps node ids to ``{"class_type": str, "inputs": {name: value}, "_meta"?: {...}}``. An input
value is a literal or a link ``[source_node_id, output_index]``. The official SDK puts an uploaded asset
where a file name would go: ``{"__type": "core/ASSET", "info": {"id", "hash"?, "file_path"?}}``.

Every ``ValidationFailed`` raised here and in ``policy.py``, ``rewrite.py`` and ``catalog.py`` carries
one details shape (``NodeErrors`` builds it)::

    {"node_errors": {"<node_id>": [{"type": "<error type>", "message": "<text>", "input": "<name>"}]}}

``input`` is present only when a single input is at fault. Failures of the whole graph (not an object,
empty, a UI export, no output node) carry ``{"node_errors": {}}``; ``too_many_nodes`` carries
``{"node_count": n, "max_nodes": m}``. Error types reuse ComfyUI's names where it has one
(``bad_linked_input``, ``required_input_missing``, ``return_type_mismatch``, ...).

The node policy (``NodePolicy``, ``check_policy``) lives in ``policy.py`` and the rewrite a worker
applies before a graph reaches ComfyUI (``prepare_for_run``, ``sanitize_filename``) in ``rewrite.py``.
Both build on this module, so it re-exports their names lazily, on first use (see the end).
"""

from __future__ import annotations

import math
import re
import sys
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict, TypeGuard

from comfyfleet.errors import ValidationFailed

__all__ = [
    "ASSET_TYPE",
    "FILENAME_PREFIX",
    "NO_NODE_LIMIT",
    "AssetRef",
    "NodeErrorDetail",
    "NodeErrors",
    "find_asset_refs",
    "graph_error",
    "is_asset_ref",
    "is_link",
    "iter_asset_refs",
    "links_of",
    "looks_like_ui_export",
    "short_repr",
    "validate_api_format",
]

ASSET_TYPE = "core/ASSET"
FILENAME_PREFIX = "filename_prefix"
# sys.maxsize, for callers that re-check a graph whose size was already judged at submit.
NO_NODE_LIMIT = sys.maxsize

_MAX_NODE_ID_CHARS = 128
_MAX_ASSET_ID_CHARS = 256
# Values nest only inside {"__value__": ...} wrappers and plain dicts; anything deeper is abuse.
_MAX_VALUE_DEPTH = 32
_HASH_RE = re.compile(r"blake3:[0-9a-f]{64}")
_UI_EXPORT_KEYS = ("links", "last_node_id", "last_link_id", "version")


class NodeErrorDetail(TypedDict):
    type: str
    message: str
    input: NotRequired[str]


class NodeErrors:
    """Collects per-node problems so that one response lists all of them, not only the first."""

    def __init__(self, graph: Mapping[str, object]) -> None:
        self._graph = graph
        self._errors: dict[str, list[NodeErrorDetail]] = {}

    def add(self, node_id: str, type_: str, message: str, *, input_name: str | None = None) -> None:
        detail: NodeErrorDetail = {"type": type_, "message": message}
        if input_name is not None:
            detail["input"] = input_name
        self._errors.setdefault(_display_id(node_id), []).append(detail)

    def __bool__(self) -> bool:
        return bool(self._errors)

    def raise_if_any(self, *, code: str = "invalid_workflow") -> None:
        if not self._errors:
            return
        ordered = {node_id: self._errors[node_id] for node_id in sorted(self._errors, key=_node_sort_key)}
        first_id, first = next(iter(ordered.items()))
        total = sum(len(errors) for errors in ordered.values())
        message = f"Node {first_id} ({self._class_of(first_id)}): {first[0]['message']}"
        if total > 1:
            message += f" (and {total - 1} more error{'s' if total > 2 else ''})"
        raise ValidationFailed(message, code=code, details={"node_errors": ordered})

    def _class_of(self, node_id: str) -> str:
        node = self._graph.get(node_id)
        class_type = node.get("class_type") if isinstance(node, Mapping) else None
        return class_type if isinstance(class_type, str) and class_type else "unknown class"


def graph_error(message: str, *, code: str = "invalid_workflow") -> ValidationFailed:
    """A failure of the graph as a whole, with the same details shape as per-node failures."""
    return ValidationFailed(message, code=code, details={"node_errors": {}})


def _display_id(node_id: str) -> str:
    return node_id if len(node_id) <= _MAX_NODE_ID_CHARS else node_id[:_MAX_NODE_ID_CHARS] + "…"


def _node_sort_key(node_id: str) -> tuple[int, int, str]:
    # Numeric ids ("2" before "10") first, as ComfyUI's editor numbers them.
    return (0, int(node_id), "") if node_id.isascii() and node_id.isdigit() else (1, 0, node_id)


def short_repr(value: object, limit: int = 80) -> str:
    """repr() bounded in length: messages echo user values, which may be megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- links and typed values -----------------------------------------------------------------------


def is_link(value: object) -> TypeGuard[list[Any]]:
    """``[node_id: str, output_index: int]``; ComfyUI reads every list input value as a link."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
        and value[1] >= 0
    )


def is_asset_ref(value: object) -> TypeGuard[dict[str, Any]]:
    return isinstance(value, dict) and value.get("__type") == ASSET_TYPE


def _asset_problem(value: dict[str, Any]) -> str | None:
    info = value.get("info")
    if not isinstance(info, dict):
        return "malformed core/ASSET reference: 'info' must be an object"
    asset_id = info.get("id")
    if not isinstance(asset_id, str) or not asset_id or len(asset_id) > _MAX_ASSET_ID_CHARS:
        return "malformed core/ASSET reference: 'info.id' must be a non-empty string"
    digest = info.get("hash")
    if digest is not None and not (isinstance(digest, str) and _HASH_RE.fullmatch(digest)):
        return "malformed core/ASSET reference: 'info.hash' must be 'blake3:' and 64 lowercase hex digits"
    file_path = info.get("file_path")
    if file_path is not None and not isinstance(file_path, str):
        return "malformed core/ASSET reference: 'info.file_path' must be a string"
    return None


# -- shape ----------------------------------------------------------------------------------------


def looks_like_ui_export(workflow: Mapping[str, object]) -> bool:
    """The editor's own save format: a ``nodes`` list beside ``links`` and friends. In the API format
    every top-level value is a node object, so a list under ``nodes`` cannot be an API graph."""
    return isinstance(workflow.get("nodes"), list) and any(key in workflow for key in _UI_EXPORT_KEYS)


def validate_api_format(workflow: object, *, max_nodes: int) -> dict[str, dict[str, Any]]:
    """Check that ``workflow`` is an API-format graph and return it (the same object, typed).

    Raises ``ValidationFailed``: ``workflow_format_ui`` for an editor export, ``too_many_nodes`` above
    ``max_nodes``, ``invalid_workflow`` for a malformed graph (per-node details), ``missing_asset`` for
    a malformed ``core/ASSET`` reference (the contract's code for an unusable reference).
    """
    graph = _require_node_map(workflow)
    if len(graph) > max_nodes:
        raise ValidationFailed(
            f"workflow has {len(graph)} nodes; the limit is {max_nodes}",
            code="too_many_nodes",
            details={"node_count": len(graph), "max_nodes": max_nodes},
        )
    errors = NodeErrors(graph)
    asset_errors = NodeErrors(graph)
    for node_id, node in graph.items():
        _check_node(graph, node_id, node, errors, asset_errors)
    errors.raise_if_any()
    # Cycles are looked for only once every link is known to be well formed.
    for node_id in sorted(_cycle_members(graph), key=_node_sort_key):
        errors.add(node_id, "dependency_cycle", "node is part of a dependency cycle")
    errors.raise_if_any()
    asset_errors.raise_if_any(code="missing_asset")
    return graph


def _require_node_map(workflow: object) -> dict[str, Any]:
    if not isinstance(workflow, dict):
        raise graph_error("workflow must be a JSON object mapping node ids to nodes")
    if looks_like_ui_export(workflow):
        raise graph_error(
            "workflow is a UI-format export (nodes/links); "
            "export it with 'Save (API Format)' and submit that",
            code="workflow_format_ui",
        )
    if not workflow:
        raise graph_error("workflow has no nodes")
    if len(workflow) == 1:
        key, value = next(iter(workflow.items()))
        if key in ("prompt", "workflow") and isinstance(value, dict) and "class_type" not in value:
            raise graph_error(f"workflow is wrapped in a {key!r} key; submit the node map itself")
    return workflow


def _check_node(
    graph: Mapping[str, Any], node_id: object, node: object, errors: NodeErrors, asset_errors: NodeErrors
) -> None:
    if not isinstance(node_id, str) or not node_id or len(node_id) > _MAX_NODE_ID_CHARS:
        errors.add(
            str(node_id), "invalid_node_id", f"node ids are strings of 1 to {_MAX_NODE_ID_CHARS} characters"
        )
        return
    if not isinstance(node, dict):
        errors.add(node_id, "invalid_node", "a node must be an object with 'class_type' and 'inputs'")
        return
    class_type = node.get("class_type")
    if not isinstance(class_type, str) or not class_type.strip():
        errors.add(node_id, "invalid_class_type", "node is missing the class_type property")
    meta = node.get("_meta")
    if meta is not None and not isinstance(meta, dict):
        errors.add(node_id, "invalid_node", "'_meta' must be an object")
    inputs = node.get("inputs")
    if not isinstance(inputs, dict):
        errors.add(node_id, "invalid_inputs", "'inputs' must be an object mapping input names to values")
        return
    for name, value in inputs.items():
        if not isinstance(name, str) or not name:
            errors.add(node_id, "invalid_input_name", "input names must be non-empty strings")
        elif isinstance(value, list):
            _check_link(graph, node_id, name, value, errors)
        else:
            _check_literal(node_id, name, value, 0, errors, asset_errors)


def _check_link(
    graph: Mapping[str, Any], node_id: str, name: str, value: list[Any], errors: NodeErrors
) -> None:
    if not is_link(value):
        errors.add(
            node_id,
            "bad_linked_input",
            f"input '{name}': a list is read as a link and must be [node_id, output_index], got "
            f'{short_repr(value)}; wrap a literal list as {{"__value__": [...]}}',
            input_name=name,
        )
    elif value[0] not in graph:
        errors.add(
            node_id,
            "linked_node_missing",
            f"input '{name}' links to node '{_display_id(value[0])}', which is not in the workflow",
            input_name=name,
        )


def _check_literal(
    node_id: str, name: str, value: object, depth: int, errors: NodeErrors, asset_errors: NodeErrors
) -> None:
    if depth > _MAX_VALUE_DEPTH:
        errors.add(node_id, "invalid_input_type", f"input '{name}' is nested too deeply", input_name=name)
    elif isinstance(value, dict):
        if "__type" in value:
            if value["__type"] != ASSET_TYPE:
                errors.add(
                    node_id,
                    "invalid_input_type",
                    f"input '{name}' holds a typed value {short_repr(value['__type'])}; "
                    "only core/ASSET is supported",
                    input_name=name,
                )
            elif (problem := _asset_problem(value)) is not None:
                asset_errors.add(
                    node_id, "invalid_asset_reference", f"input '{name}': {problem}", input_name=name
                )
            return
        for item in value.values():
            _check_literal(node_id, name, item, depth + 1, errors, asset_errors)
    elif isinstance(value, list):
        # Inside a wrapper a list is data, not a link.
        for item in value:
            _check_literal(node_id, name, item, depth + 1, errors, asset_errors)
    elif isinstance(value, float) and not math.isfinite(value):
        errors.add(node_id, "invalid_input_type", f"input '{name}' must be a finite number", input_name=name)
    elif value is not None and not isinstance(value, str | int | float | bool):
        errors.add(
            node_id,
            "invalid_input_type",
            f"input '{name}' holds a non-JSON {type(value).__name__}",
            input_name=name,
        )


def links_of(node: Mapping[str, Any]) -> Iterator[tuple[str, list[Any]]]:
    for name, value in node["inputs"].items():
        if is_link(value):
            yield name, value


def _cycle_members(graph: Mapping[str, dict[str, Any]]) -> set[str]:
    """Nodes on a dependency cycle (or between two cycles), in O(nodes + links).

    Peeling nodes without unresolved sources leaves the cycles plus everything downstream of them;
    peeling that remainder from the other end leaves only the cycles.
    """
    sources = {node_id: {link[0] for _, link in links_of(node)} for node_id, node in graph.items()}
    remaining = _peel(set(graph), sources)
    dependents: dict[str, set[str]] = {node_id: set() for node_id in remaining}
    for node_id in remaining:
        for source in sources[node_id] & remaining:
            dependents[source].add(node_id)
    return _peel(remaining, dependents)


def _peel(nodes: set[str], edges: Mapping[str, set[str]]) -> set[str]:
    """Repeatedly drop nodes with no edge into the remaining set; what is left holds every cycle."""
    pending = {node_id: len(edges[node_id] & nodes) for node_id in nodes}
    reverse: dict[str, list[str]] = {node_id: [] for node_id in nodes}
    for node_id in nodes:
        for target in edges[node_id] & nodes:
            reverse[target].append(node_id)
    queue = deque(node_id for node_id, count in pending.items() if count == 0)
    left = set(nodes)
    while queue:
        node_id = queue.popleft()
        left.discard(node_id)
        for waiting in reverse[node_id]:
            pending[waiting] -= 1
            if pending[waiting] == 0:
                queue.append(waiting)
    return left


# -- asset references -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssetRef:
    node_id: str
    input: str
    asset_id: str
    hash: str | None
    file_path: str | None
    # Where inside the input value the reference sits; () when the value itself is the reference.
    path: tuple[str | int, ...] = ()


def find_asset_refs(workflow: object) -> list[AssetRef]:
    """Every ``core/ASSET`` reference in the graph, in node order. Validates the shape first."""
    graph = validate_api_format(workflow, max_nodes=NO_NODE_LIMIT)
    return list(iter_asset_refs(graph))


def iter_asset_refs(graph: Mapping[str, dict[str, Any]]) -> Iterator[AssetRef]:
    """Every ``core/ASSET`` reference of a graph ``validate_api_format`` already accepted."""
    for node_id, node in graph.items():
        for name, value in node["inputs"].items():
            if is_link(value):
                continue
            for path, ref in _walk_assets(value, ()):
                info = ref["info"]
                yield AssetRef(node_id, name, info["id"], info.get("hash"), info.get("file_path"), path)


def _walk_assets(
    value: object, path: tuple[str | int, ...]
) -> Iterator[tuple[tuple[str | int, ...], dict[str, Any]]]:
    if is_asset_ref(value):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk_assets(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk_assets(item, (*path, index))
