"""POST /prompt validation with the error bodies of transcript 03.

Each output node is validated with its upstream graph. A node's result is memoised, so a node shared
by two outputs is judged once. The prompt is accepted when at least one output is valid; the errors
of the others come back as ``node_errors`` next to the 200.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

from .config import Dirs
from .nodes import NODES, NodeDef

Error = dict[str, Any]


@dataclass
class Validation:
    ok: bool
    error: Error | None = None
    outputs: list[str] = field(default_factory=list)
    node_errors: dict[str, Any] = field(default_factory=dict)


def _error(kind: str, message: str, details: str = "", extra: dict[str, Any] | None = None) -> Error:
    return {"type": kind, "message": message, "details": details, "extra_info": extra or {}}


def full_type_name(exc: BaseException) -> str:
    """``PIL.UnidentifiedImageError``, but plain ``KeyError`` for builtins (as ComfyUI reports them)."""
    cls = type(exc)
    if cls.__module__ in (None, "builtins"):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _types_match(received: str, expected: Any) -> bool:
    if not isinstance(expected, str):
        return False
    if "*" in (received, expected) or received == expected:
        return True
    wanted = {t.strip() for t in expected.split(",")}
    return {t.strip() for t in received.split(",")} <= wanted


_CONVERT = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


class _Validator:
    def __init__(self, prompt: dict[str, Any], dirs: Dirs) -> None:
        self.prompt = prompt
        self.dirs = dirs
        self.results: dict[str, tuple[bool, list[Error]]] = {}

    def node(self, node_id: str) -> tuple[bool, list[Error]]:
        if node_id in self.results:
            return self.results[node_id]
        node = self.prompt[node_id]
        cls = NODES[node["class_type"]]
        inputs: dict[str, Any] = node.setdefault("inputs", {})
        errors: list[Error] = []
        valid = True
        for name, spec in cls.inputs(self.dirs).items():
            if name == "hidden":
                continue
            for input_name in spec:
                ok = self._input(cls, inputs, input_name, required=name == "required", errors=errors)
                valid = valid and ok
        if cls.validate is not None:
            args = {name: inputs[name] for name in cls.validate_names if name in inputs}
            if len(args) == len(cls.validate_names):
                verdict = cls.validate(self.dirs, **args)
                if verdict is not True:
                    for input_name in args:
                        details = input_name if verdict is False else f"{input_name} - {verdict}"
                        errors.append(
                            _error(
                                "custom_validation_failed",
                                "Custom validation failed for node",
                                details,
                                {"input_name": input_name},
                            )
                        )
        result = (valid and not errors, errors)
        self.results[node_id] = result
        return result

    def _input(
        self, cls: NodeDef, inputs: dict[str, Any], name: str, *, required: bool, errors: list[Error]
    ) -> bool:
        """Check one input; returns False when an upstream node is invalid (without an error of its own)."""
        if name not in inputs:
            if required:
                errors.append(
                    _error("required_input_missing", "Required input is missing", name, {"input_name": name})
                )
            return True
        info = cls.input_info(self.dirs, name)
        assert info is not None
        input_type, _category, extra = info
        config = [input_type, extra]
        value = inputs[name]
        if isinstance(value, list):
            return self._link(name, value, input_type, config, errors)
        if isinstance(input_type, str) and input_type in _CONVERT:
            try:
                value = _CONVERT[input_type](value)
                inputs[name] = value
            except (TypeError, ValueError) as exc:
                errors.append(
                    _error(
                        "invalid_input_type",
                        f"Failed to convert an input value to a {input_type} value",
                        f"{name}, {value}, {exc}",
                        {
                            "input_name": name,
                            "input_config": config,
                            "received_value": value,
                            "exception_message": str(exc),
                        },
                    )
                )
                return True
        if name in cls.validate_names:
            return True  # the node's own VALIDATE_INPUTS judges this input
        bounds = {"input_name": name, "input_config": config, "received_value": value}
        if "min" in extra and value < extra["min"]:
            errors.append(
                _error(
                    "value_smaller_than_min",
                    f"Value {value} smaller than min of {extra['min']}",
                    name,
                    bounds,
                )
            )
        elif "max" in extra and value > extra["max"]:
            errors.append(
                _error(
                    "value_bigger_than_max", f"Value {value} bigger than max of {extra['max']}", name, bounds
                )
            )
        elif isinstance(input_type, list) and value not in input_type:
            listing = f"(list of length {len(input_type)})" if len(input_type) > 20 else str(input_type)
            errors.append(
                _error(
                    "value_not_in_list", "Value not in list", f"{name}: '{value}' not in {listing}", bounds
                )
            )
        return True

    def _link(
        self, name: str, link: list[Any], input_type: Any, config: list[Any], errors: list[Error]
    ) -> bool:
        if len(link) != 2:
            errors.append(
                _error(
                    "bad_linked_input",
                    "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    name,
                    {"input_name": name, "input_config": config, "received_value": link},
                )
            )
            return True
        source_id = str(link[0])
        # A link to a node that is not in the prompt raises KeyError here, on purpose: the caller turns
        # it into exception_during_validation exactly as ComfyUI does (transcript 03 d).
        source_cls = NODES[self.prompt[source_id]["class_type"]]
        received = source_cls.return_types[link[1]]
        if not _types_match(received, input_type):
            errors.append(
                _error(
                    "return_type_mismatch",
                    "Return type mismatch between linked nodes",
                    f"{name}, received_type({received}) mismatch input_type({input_type})",
                    {
                        "input_name": name,
                        "input_config": config,
                        "received_type": received,
                        "linked_node": link,
                    },
                )
            )
            return True
        try:
            upstream_ok, _ = self.node(source_id)
        except Exception as exc:
            errors.append(
                _error(
                    "exception_during_inner_validation",
                    "Exception when validating inner node",
                    str(exc),
                    {
                        "input_name": name,
                        "input_config": config,
                        "exception_message": str(exc),
                        "exception_type": full_type_name(exc),
                        "traceback": traceback.format_tb(exc.__traceback__),
                        "linked_node": link,
                    },
                )
            )
            return True
        return upstream_ok


def _structure_error(prompt: Any) -> Error | None:
    if not isinstance(prompt, dict):
        return _error("invalid_prompt", "Cannot execute because the prompt is not an object.")
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return _error(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            )
        if node["class_type"] not in NODES:
            return _error(
                "invalid_prompt",
                f"Cannot execute because node {node['class_type']} does not exist.",
                f"Node ID '#{node_id}'",
            )
    return None


def validate_prompt(prompt: Any, dirs: Dirs, targets: list[str] | None = None) -> Validation:
    structure = _structure_error(prompt)
    if structure is not None:
        return Validation(ok=False, error=structure)
    candidates = [
        node_id
        for node_id, node in prompt.items()
        if NODES[node["class_type"]].output_node and (targets is None or node_id in targets)
    ]
    if not candidates:
        return Validation(ok=False, error=_error("prompt_no_outputs", "Prompt has no outputs"))

    validator = _Validator(prompt, dirs)
    good: list[str] = []
    own_errors: list[Error] = []
    node_errors: dict[str, Any] = {}
    for output_id in candidates:
        try:
            ok, reasons = validator.node(output_id)
        except Exception as exc:
            ok = False
            reasons = [
                _error(
                    "exception_during_validation",
                    "Exception when validating node",
                    str(exc),
                    {
                        "exception_type": full_type_name(exc),
                        "traceback": traceback.format_tb(exc.__traceback__),
                    },
                )
            ]
            validator.results[output_id] = (False, reasons)
        if ok:
            good.append(output_id)
            continue
        own_errors.extend(reasons)
        # Like ComfyUI, every invalid node seen so far is charged to this output.
        for node_id, (node_ok, node_reasons) in validator.results.items():
            if node_ok or not node_reasons:
                continue
            entry = node_errors.setdefault(
                node_id,
                {
                    "errors": node_reasons,
                    "dependent_outputs": [],
                    "class_type": prompt[node_id]["class_type"],
                },
            )
            entry["dependent_outputs"].append(output_id)

    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for e in own_errors)
        error = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
        return Validation(ok=False, error=error, node_errors=node_errors)
    # ComfyUI hands back a set here; reverse prompt order reproduces the recorded lists (04, 16).
    return Validation(ok=True, outputs=list(reversed(good)), node_errors=node_errors)
