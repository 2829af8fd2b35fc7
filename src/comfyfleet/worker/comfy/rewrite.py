"""The rewrite a worker applies before a graph reaches ComfyUI (``prepare_for_run``), and the forced
output prefix (``forced_prefix``).

``prepare_for_run`` checks the graph against the node policy (``policy.py``), replaces every
``core/ASSET`` reference with the name of the staged file, and forces every ``filename_prefix`` into
the job's output folder. Pure functions, no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from comfyfleet.filenames import sanitize_filename
from comfyfleet.worker.comfy.graph import (
    FILENAME_PREFIX,
    NO_NODE_LIMIT,
    NodeErrors,
    is_asset_ref,
    iter_asset_refs,
    short_repr,
    validate_api_format,
)
from comfyfleet.worker.comfy.policy import NodePolicy, policy_errors

# -- file names -----------------------------------------------------------------------------------


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
    policy_errors(graph, policy, staged).raise_if_any()
    missing = NodeErrors(graph)
    for ref in iter_asset_refs(graph):
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
