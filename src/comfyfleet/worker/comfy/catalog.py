"""A worker's node catalog (ComfyUI's ``GET /object_info``) and validation of a graph against it.

The aim is to refuse at submit, with a 422 and per-node details, what ComfyUI would refuse later and
turn into a failed job. The rules follow ComfyUI 0.8.0's ``validate_inputs``, with these differences:

- primitive types are checked strictly (ComfyUI coerces ``"5"`` to an INT and ``"false"`` to True);
- any invalid node fails the whole graph, where ComfyUI runs the outputs that did validate;
- file inputs accept a ``core/ASSET`` reference, and their file names are left to the node policy in
  ``graph.py`` (the catalog lists this worker's input folder, which says nothing about the job);
- V3 dynamic inputs (autogrow, dynamic combo, dynamic slot) are not checked.

Like ComfyUI, inputs are checked only on nodes that an output node depends on; class names are
checked everywhere. Details use the shape documented in ``graph.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from comfyfleet.worker.comfy.graph import (
    FILENAME_PREFIX,
    NO_NODE_LIMIT,
    NodeErrors,
    graph_error,
    is_asset_ref,
    is_link,
    links_of,
    short_repr,
    validate_api_format,
)
from comfyfleet.worker.comfy.policy import DEFAULT_DENIED, KNOWN_FILE_INPUTS, NodePolicy

COMBO = "COMBO"
# Types that link to anything: ComfyUI's any-type and the V3 generic types the frontend resolves.
WILDCARD_TYPES = frozenset({"*", "COMFY_MATCHTYPE_V3", "COMFY_MULTITYPED_V3"})
# V3 inputs that expand into other inputs ("name.sub"); their shape is the frontend's business.
DYNAMIC_TYPES = frozenset({"COMFY_AUTOGROW_V3", "COMFY_DYNAMICCOMBO_V3", "COMFY_DYNAMICSLOT_V3"})
PRIMITIVE_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN"})
# Tensor and model types only a link can supply. Other unknown types may be custom widgets whose
# literal values only their node understands, so those are let through.
SOCKET_ONLY_TYPES = frozenset(
    {
        "IMAGE", "MASK", "LATENT", "MODEL", "CLIP", "VAE", "CONDITIONING", "AUDIO", "VIDEO",
        "CONTROL_NET", "CLIP_VISION", "CLIP_VISION_OUTPUT", "STYLE_MODEL", "UPSCALE_MODEL",
        "NOISE", "SIGMAS", "SAMPLER", "GUIDER", "GLIGEN",
    }
)  # fmt: skip
_MAX_LISTED_OPTIONS = 20


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One declared input. Both combo spellings (``[[...options], {...}]`` and
    ``["COMBO", {"options": [...]}]``) read as ``type == "COMBO"`` with ``options`` set."""

    name: str
    required: bool
    type: str
    options: tuple[object, ...] | None = None
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_file_input(self) -> bool:
        # image_upload, video_upload, audio_upload, file_upload: the editor's upload widgets, which
        # write into and pick from ComfyUI's input folder; image_folder names a folder to read from.
        return "image_folder" in self.config or any(
            key.endswith("_upload") and bool(flag) for key, flag in self.config.items()
        )


def _parse_input(name: str, raw: object, *, required: bool) -> InputSpec:
    if not isinstance(raw, list | tuple) or not raw:
        return InputSpec(name, required, "*")
    declared = raw[0]
    config = raw[1] if len(raw) > 1 and isinstance(raw[1], Mapping) else {}
    if isinstance(declared, list | tuple):
        return InputSpec(name, required, COMBO, tuple(declared), config)
    if declared == COMBO and isinstance(config.get("options"), list | tuple):
        return InputSpec(name, required, COMBO, tuple(config["options"]), config)
    return InputSpec(name, required, declared if isinstance(declared, str) else "*", None, config)


def _parse_inputs(schema: Mapping[str, Any]) -> dict[str, InputSpec]:
    declared = schema.get("input")
    specs: dict[str, InputSpec] = {}
    if not isinstance(declared, Mapping):
        return specs
    for category in ("required", "optional"):
        group = declared.get(category)
        if isinstance(group, Mapping):
            for name, raw in group.items():
                specs[name] = _parse_input(name, raw, required=category == "required")
    return specs


def _parse_outputs(schema: Mapping[str, Any]) -> tuple[str, ...]:
    outputs = schema.get("output")
    if not isinstance(outputs, list | tuple):
        return ()
    # An output declared as a list of values is a combo, and links into combo inputs as such.
    return tuple(COMBO if isinstance(t, list | tuple) else t if isinstance(t, str) else "*" for t in outputs)


class NodeCatalog:
    """The node classes one ComfyUI reports, with the questions the worker asks of them."""

    def __init__(self, object_info: Mapping[str, Any]) -> None:
        schemas = {name: schema for name, schema in object_info.items() if isinstance(schema, Mapping)}
        self._inputs = {name: _parse_inputs(schema) for name, schema in schemas.items()}
        self._outputs = {name: _parse_outputs(schema) for name, schema in schemas.items()}
        self._output_nodes = frozenset(
            name for name, schema in schemas.items() if schema.get("output_node") is True
        )

    def __contains__(self, class_type: object) -> bool:
        return class_type in self._inputs

    @property
    def class_names(self) -> frozenset[str]:
        return frozenset(self._inputs)

    def is_output_node(self, class_type: str) -> bool:
        return class_type in self._output_nodes

    def output_types(self, class_type: str) -> tuple[str, ...]:
        return self._outputs.get(class_type, ())

    def inputs(self, class_type: str) -> Mapping[str, InputSpec]:
        return MappingProxyType(self._inputs.get(class_type, {}))

    def file_inputs(self, class_type: str) -> frozenset[str]:
        flagged = {spec.name for spec in self._inputs.get(class_type, {}).values() if spec.is_file_input}
        return frozenset(flagged) | KNOWN_FILE_INPUTS.get(class_type, frozenset())

    def is_file_input(self, class_type: str, input_name: str) -> bool:
        return input_name in self.file_inputs(class_type)

    @property
    def prefix_classes(self) -> frozenset[str]:
        """Classes that declare a filename_prefix input, required or optional."""
        return frozenset(name for name, specs in self._inputs.items() if FILENAME_PREFIX in specs)

    def policy(
        self, *, allowed: frozenset[str] | None = None, denied: frozenset[str] = DEFAULT_DENIED
    ) -> NodePolicy:
        """A node policy bounded by this catalog: unknown classes are refused, file inputs are the
        ones this ComfyUI flags for upload plus the ones ``policy.KNOWN_FILE_INPUTS`` names."""
        file_inputs = dict(KNOWN_FILE_INPUTS)
        for class_type in self._inputs:
            if names := self.file_inputs(class_type):
                file_inputs[class_type] = names
        return NodePolicy(
            allowed=allowed,
            denied=denied,
            catalog_classes=self.class_names,
            file_inputs=MappingProxyType(file_inputs),
            prefix_classes=self.prefix_classes,
        )


def validate_against_catalog(workflow: object, object_info: Mapping[str, Any] | NodeCatalog) -> None:
    """Raise ``ValidationFailed`` (``invalid_workflow``, per-node details) for what this catalog's
    ComfyUI would refuse: unknown classes, missing required inputs, values of the wrong type, outside
    their range or their list, links to a missing output or of the wrong type, and a graph with no
    output node."""
    graph = validate_api_format(workflow, max_nodes=NO_NODE_LIMIT)
    catalog = object_info if isinstance(object_info, NodeCatalog) else NodeCatalog(object_info)
    errors = NodeErrors(graph)
    for node_id, node in graph.items():
        if node["class_type"] not in catalog:
            errors.add(
                node_id,
                "unknown_node_class",
                f"node class '{node['class_type']}' does not exist on this worker",
            )
    # Further checks would only repeat the unknown class in other words.
    errors.raise_if_any()
    outputs = [node_id for node_id, node in graph.items() if catalog.is_output_node(node["class_type"])]
    if not outputs:
        raise graph_error(
            "workflow has no output node (such as SaveImage or PreviewImage), so nothing would run"
        )
    for node_id in _needed_by(graph, outputs):
        _check_inputs(graph, node_id, catalog, errors)
    errors.raise_if_any()


def _needed_by(graph: Mapping[str, dict[str, Any]], outputs: Iterable[str]) -> list[str]:
    """The output nodes and every node they depend on, in graph order."""
    needed = set(outputs)
    stack = list(needed)
    while stack:
        for _, link in links_of(graph[stack.pop()]):
            if link[0] not in needed:
                needed.add(link[0])
                stack.append(link[0])
    return [node_id for node_id in graph if node_id in needed]


def _check_inputs(
    graph: Mapping[str, dict[str, Any]], node_id: str, catalog: NodeCatalog, errors: NodeErrors
) -> None:
    class_type: str = graph[node_id]["class_type"]
    inputs: Mapping[str, Any] = graph[node_id]["inputs"]
    for spec in catalog.inputs(class_type).values():
        if spec.type in DYNAMIC_TYPES:
            continue
        if spec.name not in inputs:
            if spec.required:
                errors.add(
                    node_id,
                    "required_input_missing",
                    f"required input '{spec.name}' is missing",
                    input_name=spec.name,
                )
            continue
        value = inputs[spec.name]
        if is_link(value):
            problem = _link_problem(graph, catalog, value, spec)
        else:
            problem = _literal_problem(value, spec, is_file=catalog.is_file_input(class_type, spec.name))
        if problem is not None:
            errors.add(node_id, problem[0], f"input '{spec.name}': {problem[1]}", input_name=spec.name)


def _link_problem(
    graph: Mapping[str, dict[str, Any]], catalog: NodeCatalog, link: list[Any], spec: InputSpec
) -> tuple[str, str] | None:
    source_id, index = link[0], link[1]
    source_class = graph[source_id]["class_type"]
    outputs = catalog.output_types(source_class)
    if index >= len(outputs):
        return (
            "linked_output_missing",
            f"links to output {index} of node {source_id} ({source_class}), "
            f"which has {len(outputs)} output(s)",
        )
    received = outputs[index]
    if types_compatible(received, spec.type):
        return None
    return (
        "return_type_mismatch",
        f"expects {spec.type} but output {index} of node {source_id} ({source_class}) is {received}",
    )


def _type_set(declared: str) -> frozenset[str]:
    # "IMAGE,MASK" declares a union of types.
    return frozenset(part.strip() for part in declared.split(","))


def types_compatible(received: str, expected: str) -> bool:
    """ComfyUI's rule: equal, either side a wildcard, or the comma-separated unions overlap."""
    if received == expected:
        return True
    received_set, expected_set = _type_set(received), _type_set(expected)
    if received_set & WILDCARD_TYPES or expected_set & WILDCARD_TYPES:
        return True
    return bool(received_set & expected_set)


def _literal_problem(value: object, spec: InputSpec, *, is_file: bool) -> tuple[str, str] | None:
    if is_asset_ref(value):
        return (
            None
            if is_file
            else ("invalid_input_type", "a core/ASSET reference can only be given to a file input")
        )
    if is_file and isinstance(value, str):
        return None
    if isinstance(value, dict) and "__value__" in value:
        # ComfyUI's wrapper for literal lists (a bare list would read as a link).
        value = value["__value__"]
    if spec.options is not None:
        return _combo_problem(value, spec)
    declared = _type_set(spec.type)
    if declared & WILDCARD_TYPES:
        return None
    primitives = declared & PRIMITIVE_TYPES
    if not primitives:
        if declared & SOCKET_ONLY_TYPES:
            return (
                "invalid_input_type",
                f"expects a link from a node producing {spec.type}, not a literal value",
            )
        return None
    if not any(_is_primitive(value, primitive) for primitive in primitives):
        expected = " or ".join(sorted(primitives))
        return "invalid_input_type", f"expects {expected}, got {_json_type(value)} {short_repr(value)}"
    return _range_problem(value, spec.config)


def _is_primitive(value: object, primitive: str) -> bool:
    if primitive == "BOOLEAN":
        return isinstance(value, bool)
    if primitive == "STRING":
        return isinstance(value, str)
    if isinstance(value, bool):
        return False
    if primitive == "INT":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, int | float)  # FLOAT


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _range_problem(value: object, config: Mapping[str, Any]) -> tuple[str, str] | None:
    if not _is_number(value):
        return None
    low, high = config.get("min"), config.get("max")
    if _is_number(low) and value < low:  # type: ignore[operator]
        return "value_smaller_than_min", f"value {value} is smaller than the minimum {low}"
    if _is_number(high) and value > high:  # type: ignore[operator]
        return "value_bigger_than_max", f"value {value} is bigger than the maximum {high}"
    return None


def _combo_problem(value: object, spec: InputSpec) -> tuple[str, str] | None:
    options = spec.options or ()
    multi = bool(spec.config.get("multi_select") or spec.config.get("multiselect"))
    chosen = value if multi and isinstance(value, list) else [value]
    for item in chosen:
        if isinstance(item, bool) or item not in options:
            listed = (
                short_repr(list(options), limit=400)
                if len(options) <= _MAX_LISTED_OPTIONS
                else f"a list of {len(options)} options"
            )
            return "value_not_in_list", f"{short_repr(item)} is not in {listed}"
    return None
