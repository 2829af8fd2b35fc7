"""API-format ComfyUI graphs: shape checks, ``core/ASSET`` references, node policy, and the rewrite a
worker applies before a graph reaches ComfyUI. Pure functions, no I/O.

A graph maps node ids to ``{"class_type": str, "inputs": {name: value}, "_meta"?: {...}}``. An input
value is a literal or a link ``[source_node_id, output_index]``. The official SDK puts an uploaded asset
where a file name would go: ``{"__type": "core/ASSET", "info": {"id", "hash"?, "file_path"?}}``.

Every ``ValidationFailed`` raised here and in ``catalog.py`` carries one details shape::

    {"node_errors": {"<node_id>": [{"type": "<error type>", "message": "<text>", "input": "<name>"}]}}

``input`` is present only when a single input is at fault. Failures of the whole graph (not an object,
empty, a UI export, no output node) carry ``{"node_errors": {}}``; ``too_many_nodes`` carries
``{"node_count": n, "max_nodes": m}``. Error types reuse ComfyUI's names where it has one
(``bad_linked_input``, ``required_input_missing``, ``return_type_mismatch``, ...).
"""

from __future__ import annotations

import copy
import math
import re
import sys
import unicodedata
from collections import deque
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NotRequired, TypedDict, TypeGuard

from comfyfleet.errors import ValidationFailed

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
    return list(_iter_asset_refs(graph))


def _iter_asset_refs(graph: Mapping[str, dict[str, Any]]) -> Iterator[AssetRef]:
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


# -- node policy ----------------------------------------------------------------------------------

DEFAULT_DENIED: frozenset[str] = frozenset(
    {
        # Read files the job does not own: the shared output folder (other tenants' results), or
        # whole input sub-folders, which is where every job's staged inputs live.
        "LoadImageOutput",
        "LoadImageDataSetFromFolder",
        "LoadImageTextDataSetFromFolder",
        "LoadImageSetFromFolderNode",
        "LoadImageTextSetFromFolderNode",
        "LoadTrainingDataset",
        # Write under a caller-chosen folder or prefix that is not a ComfyUI filename_prefix, so the
        # worker cannot force it into the job's folder ("../" reaches outside the output folder).
        "SaveImageDataSetToFolder",
        "SaveImageTextDataSetToFolder",
        "SaveTrainingDataset",
        "SaveLoRANode",
        # Write model weights: gigabytes per run that the worker would then upload as job outputs.
        "CheckpointSave",
        "ImageOnlyCheckpointSave",
        "CLIPSave",
        "VAESave",
        "ModelSave",
        "LoraSave",
        # Popular custom nodes that take a server path, directory or URL as a plain string.
        "VHS_LoadVideoPath",
        "VHS_LoadVideoFFmpegPath",
        "VHS_LoadImagePath",
        "VHS_LoadImagesPath",
        "VHS_LoadImages",
        "VHS_LoadAudio",
        "Image Load",
        "Image Save",
        "Load Text File",
        "Save Text File",
    }
)

# Inputs that name a file in ComfyUI's input folder. The catalog adds every input flagged for upload
# (image_upload, video_upload, ...); these are the ones object_info does not flag, or flags in a way
# older versions did not. LoadLatent stays allowed: it reads safetensors, and only staged files.
KNOWN_FILE_INPUTS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "LoadImage": frozenset({"image"}),
        "LoadImageMask": frozenset({"image"}),
        "LoadImageOutput": frozenset({"image"}),
        "WebcamCapture": frozenset({"image"}),
        "LoadLatent": frozenset({"latent"}),
        "LoadAudio": frozenset({"audio"}),
        "RecordAudio": frozenset({"audio"}),
        "LoadVideo": frozenset({"file"}),
        "Load3D": frozenset({"model_file"}),
        "Load3DAnimation": frozenset({"model_file"}),
        "VHS_LoadVideo": frozenset({"video"}),
        "VHS_LoadVideoFFmpeg": frozenset({"video"}),
        "VHS_LoadAudioUpload": frozenset({"audio"}),
    }
)

# Output nodes whose filename_prefix is optional or defaulted: the worker sets it even when the graph
# leaves it out, so no file lands outside the job's folder.
KNOWN_PREFIX_CLASSES: frozenset[str] = frozenset(
    {
        "SaveImage",
        "SaveAnimatedWEBP",
        "SaveAnimatedPNG",
        "SaveVideo",
        "SaveWEBM",
        "SaveAudio",
        "SaveAudioMP3",
        "SaveAudioOpus",
        "SaveLatent",
        "SaveGLB",
    }
)


def _known_file_inputs() -> Mapping[str, frozenset[str]]:
    return KNOWN_FILE_INPUTS


@dataclass(frozen=True, slots=True)
class NodePolicy:
    """Which node classes a tenant's graph may use, and which inputs name files.

    ``allowed=None`` admits whatever the catalog reports (or anything, without a catalog);
    ``denied`` always wins. ``NodeCatalog.policy()`` fills ``catalog_classes``, ``file_inputs`` and
    ``prefix_classes`` from the worker's ``/object_info``.
    """

    allowed: frozenset[str] | None = None
    denied: frozenset[str] = DEFAULT_DENIED
    catalog_classes: frozenset[str] | None = None
    file_inputs: Mapping[str, frozenset[str]] = field(default_factory=_known_file_inputs)
    prefix_classes: frozenset[str] = KNOWN_PREFIX_CLASSES

    def class_problem(self, class_type: str) -> tuple[str, str] | None:
        """``(error type, message)`` when ``class_type`` may not run, else None."""
        if class_type in self.denied:
            return "node_class_denied", f"node class '{class_type}' is not permitted on this service"
        if self.allowed is not None and class_type not in self.allowed:
            return "node_class_not_allowed", f"node class '{class_type}' is not in the allowed set"
        if self.catalog_classes is not None and class_type not in self.catalog_classes:
            return "unknown_node_class", f"node class '{class_type}' does not exist on this worker"
        return None

    def is_file_input(self, class_type: str, input_name: str) -> bool:
        return input_name in self.file_inputs.get(class_type, frozenset())


def check_policy(workflow: object, policy: NodePolicy, *, staged_names: Collection[str] = ()) -> None:
    """Reject node classes the policy refuses and file inputs that name anything but the job's own
    staged files. At submit time no file is staged yet, so only ``core/ASSET`` values pass."""
    graph = validate_api_format(workflow, max_nodes=NO_NODE_LIMIT)
    _policy_errors(graph, policy, frozenset(staged_names)).raise_if_any()


def _policy_errors(
    graph: Mapping[str, dict[str, Any]], policy: NodePolicy, staged: frozenset[str]
) -> NodeErrors:
    errors = NodeErrors(graph)
    for node_id, node in graph.items():
        class_type: str = node["class_type"]
        if (problem := policy.class_problem(class_type)) is not None:
            errors.add(node_id, *problem)
        for name, value in node["inputs"].items():
            if policy.is_file_input(class_type, name) and (reason := _file_reference_problem(value, staged)):
                errors.add(
                    node_id, "file_reference_not_allowed", f"input '{name}': {reason}", input_name=name
                )
    return errors


def _file_reference_problem(value: object, staged: frozenset[str]) -> str | None:
    if is_asset_ref(value):
        return None
    if isinstance(value, str):
        if value in staged:
            return None
        return (
            f"{short_repr(value)} is not one of this job's inputs; "
            "upload the file as an asset and pass its core/ASSET reference"
        )
    if is_link(value):
        # The name would be computed at run time and could point anywhere.
        return "a file input cannot be linked; pass a core/ASSET reference"
    return "a file input takes a core/ASSET reference"


# -- file names -----------------------------------------------------------------------------------

# Word characters (any script) and a few harmless punctuation marks. '%' stays so ComfyUI's
# %width%/%year% substitutions keep working in prefixes; brackets go, since "name.png [output]" is
# ComfyUI's syntax for reading from another folder.
_UNSAFE_CHARS = re.compile(r"[^\w\-.()+,=@% ]")
_EXTENSION_MAX_CHARS = 16


def sanitize_filename(name: str, *, default: str = "file", max_bytes: int = 120) -> str:
    """One safe path segment from ``name``: the last path part only, no control or format characters
    (bidi overrides, zero-width), no leading dots, at most ``max_bytes`` of UTF-8 with the extension
    kept. Returns ``default`` when nothing usable is left."""
    leaf = re.split(r"[/\\]", name)[-1]
    leaf = unicodedata.normalize("NFC", leaf)
    leaf = "".join(ch for ch in leaf if not unicodedata.category(ch).startswith("C"))
    leaf = _UNSAFE_CHARS.sub("_", leaf)
    leaf = re.sub(r"\s+", " ", leaf).strip(" .")
    if not leaf:
        return default
    if len(leaf.encode()) <= max_bytes:
        return leaf
    stem, dot, extension = leaf.rpartition(".")
    if not dot or not stem or len(extension) > _EXTENSION_MAX_CHARS:
        return _truncate_utf8(leaf, max_bytes).rstrip(" .") or default
    suffix = f".{extension}"
    stem = _truncate_utf8(stem, max_bytes - len(suffix.encode())).rstrip(" .")
    return stem + suffix if stem else default


def _truncate_utf8(text: str, max_bytes: int) -> str:
    return text.encode()[: max(max_bytes, 0)].decode(errors="ignore")


def forced_prefix(output_prefix: str, original: object) -> str:
    """``<output_prefix>/<leaf>``: only the last part of the caller's prefix survives, so neither
    folders nor ``..`` (in any spelling, e.g. ``%year%/..``) can leave the job's folder."""
    if isinstance(original, dict) and "__value__" in original:
        original = original["__value__"]
    leaf = sanitize_filename(original, default="out") if isinstance(original, str) else "out"
    return f"{output_prefix}/{leaf}"


def _require_relative_path(path: str, what: str) -> str:
    """Paths the worker itself supplies; a bad one is a bug in the caller, not a user error. A
    trailing "[...]" is refused too: ComfyUI reads "x.png [output]" from its output folder."""
    parts = path.split("/")
    if (
        not path
        or "\\" in path
        or path.endswith("]")
        or any(part in ("", ".", "..") for part in parts)
        or not all(part.isprintable() for part in parts)
    ):
        raise ValueError(f"{what} must be a plain relative path without '..' or empty parts, got {path!r}")
    return path


# -- the run-time rewrite -------------------------------------------------------------------------


def prepare_for_run(
    workflow: object, *, staged_inputs: Mapping[str, str], output_prefix: str, policy: NodePolicy
) -> dict[str, dict[str, Any]]:
    """A new graph ready for ComfyUI's ``POST /prompt``.

    ``staged_inputs`` maps asset id -> the name ComfyUI loads it by (``jobs/<job>/in/<name>``).
    Every ``core/ASSET`` value becomes that name; every ``filename_prefix`` becomes
    ``<output_prefix>/<sanitised leaf or 'out'>``; node classes the policy refuses and file inputs
    naming anything but this job's staged files fail with ``invalid_workflow``; a reference to an
    asset that was not staged fails with ``missing_asset``. Node keys other than ``class_type``,
    ``inputs`` and ``_meta`` are dropped (ComfyUI reads e.g. ``is_changed`` for caching).
    """
    graph = validate_api_format(workflow, max_nodes=NO_NODE_LIMIT)
    prefix = _require_relative_path(output_prefix, "output_prefix")
    staged = frozenset(_require_relative_path(name, "staged input name") for name in staged_inputs.values())
    _policy_errors(graph, policy, staged).raise_if_any()
    missing = NodeErrors(graph)
    for ref in _iter_asset_refs(graph):
        if ref.asset_id not in staged_inputs:
            missing.add(
                ref.node_id,
                "asset_not_staged",
                f"input '{ref.input}': asset {short_repr(ref.asset_id)} was not staged for this job",
                input_name=ref.input,
            )
    missing.raise_if_any(code="missing_asset")
    return {node_id: _rewrite_node(node, staged_inputs, prefix, policy) for node_id, node in graph.items()}


def _rewrite_node(
    node: Mapping[str, Any], staged_inputs: Mapping[str, str], output_prefix: str, policy: NodePolicy
) -> dict[str, Any]:
    inputs = {name: _substitute_assets(value, staged_inputs) for name, value in node["inputs"].items()}
    if FILENAME_PREFIX in inputs or node["class_type"] in policy.prefix_classes:
        # A linked prefix is replaced too: its value would be computed at run time.
        inputs[FILENAME_PREFIX] = forced_prefix(output_prefix, node["inputs"].get(FILENAME_PREFIX))
    rewritten: dict[str, Any] = {"class_type": node["class_type"], "inputs": inputs}
    if "_meta" in node:
        rewritten["_meta"] = copy.deepcopy(node["_meta"])
    return rewritten


def _substitute_assets(value: object, staged_inputs: Mapping[str, str]) -> object:
    if is_asset_ref(value):
        return staged_inputs[value["info"]["id"]]
    if isinstance(value, dict):
        return {key: _substitute_assets(item, staged_inputs) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute_assets(item, staged_inputs) for item in value]
    return value
