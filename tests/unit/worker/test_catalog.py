"""Validation against a node catalog (worker/comfy/catalog.py).

object_info_sample.json holds a ComfyUI 0.8.0 ``/object_info`` subset. EmptyImage and SaveImage are
copied verbatim from transcript 13; ImageScale's upscale_method list is the one transcript 03 echoes
back; the other classes are written in the same shape from ComfyUI's node definitions, with the
sampler and scheduler lists shortened. Error cases follow transcript 03 where it has one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from comfyfleet.errors import ValidationFailed
from comfyfleet.worker.comfy.catalog import InputSpec, NodeCatalog, types_compatible, validate_against_catalog
from comfyfleet.worker.comfy.policy import DEFAULT_DENIED

OBJECT_INFO: dict[str, Any] = json.loads((Path(__file__).parent / "object_info_sample.json").read_text())
CATALOG = NodeCatalog(OBJECT_INFO)


def asset(asset_id: str = "asset-1") -> dict[str, Any]:
    return {"__type": "core/ASSET", "info": {"id": asset_id, "file_path": "photo.png"}}


def empty_image(**inputs: Any) -> dict[str, Any]:
    return {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0} | inputs,
    }


def save(source: str = "1", index: int = 0) -> dict[str, Any]:
    return {"class_type": "SaveImage", "inputs": {"images": [source, index], "filename_prefix": "lab/x"}}


def txt2img() -> dict[str, Any]:
    """Transcript 14: SD1.5-architecture checkpoint, KSampler, VAEDecode, SaveImage."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "random_sd15.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 77,
                "steps": 2,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "lab/sd15"}},
    }


def errors_of(workflow: dict[str, Any], object_info: Any = CATALOG) -> dict[str, list[dict[str, Any]]]:
    with pytest.raises(ValidationFailed) as exc:
        validate_against_catalog(workflow, object_info)
    assert exc.value.code == "invalid_workflow"
    assert exc.value.status_code == 422
    node_errors: dict[str, list[dict[str, Any]]] = exc.value.details["node_errors"]
    return node_errors


def types_of(workflow: dict[str, Any], object_info: Any = CATALOG) -> dict[str, list[str]]:
    return {node: [e["type"] for e in errors] for node, errors in errors_of(workflow, object_info).items()}


# -- valid graphs ---------------------------------------------------------------------------------


def test_txt2img_graph_is_valid() -> None:
    validate_against_catalog(txt2img(), CATALOG)


def test_raw_object_info_is_accepted_too() -> None:
    validate_against_catalog(txt2img(), OBJECT_INFO)


def test_asset_reference_is_valid_in_a_file_input() -> None:
    workflow = {
        "10": {"class_type": "LoadImage", "inputs": {"image": asset()}},
        "11": {"class_type": "ImageInvert", "inputs": {"image": ["10", 0]}},
        "12": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["11", 0],
                "upscale_method": "bilinear",
                "width": 128,
                "height": 96,
                "crop": "disabled",
            },
        },
        "13": save("12"),
        "14": {"class_type": "LoadAudio", "inputs": {"audio": asset("a2")}},
        "15": {"class_type": "PreviewAny", "inputs": {"source": ["14", 0]}},
    }
    validate_against_catalog(workflow, CATALOG)


def test_file_names_in_file_inputs_are_left_to_the_node_policy() -> None:
    # The catalog's list is this worker's input folder; whether a name is allowed is graph.py's call.
    workflow = {"1": {"class_type": "LoadImage", "inputs": {"image": "jobs/job-1/in/photo.png"}}, "2": save()}
    validate_against_catalog(workflow, CATALOG)


def test_lenient_number_forms_comfyui_also_accepts() -> None:
    workflow = {"1": empty_image(width=64.0), "2": save()}
    workflow["3"] = {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 2}}
    workflow["4"] = save("3")
    validate_against_catalog(workflow, CATALOG)


def test_value_wrapper_is_unwrapped() -> None:
    workflow = {"1": empty_image(width={"__value__": 16}), "2": save()}
    validate_against_catalog(workflow, CATALOG)


def test_literals_for_wildcard_and_custom_widget_types_pass() -> None:
    info = {
        "Cam": {"input": {"required": {"shot": ["WEBCAM", {}]}}, "output": ["IMAGE"], "output_node": True}
    }
    validate_against_catalog({"1": {"class_type": "Cam", "inputs": {"shot": "frame-1"}}}, info)
    validate_against_catalog({"1": {"class_type": "PreviewAny", "inputs": {"source": "hello"}}}, CATALOG)


def test_wildcard_input_takes_any_link() -> None:
    workflow = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    validate_against_catalog(workflow, CATALOG)


# -- graph-level failures -------------------------------------------------------------------------


def test_unknown_class_is_reported_alone() -> None:
    # transcript 03 (b)
    workflow = {
        "1": {"class_type": "NoSuchNode", "inputs": {}},
        "2": save(),
        "3": {"class_type": "SaveImage", "inputs": {}},
    }
    errors = errors_of(workflow)
    assert errors == {
        "1": [
            {"type": "unknown_node_class", "message": "node class 'NoSuchNode' does not exist on this worker"}
        ]
    }


def test_graph_without_an_output_node() -> None:
    # transcript 03 (f)
    with pytest.raises(ValidationFailed, match="no output node") as exc:
        validate_against_catalog({"1": empty_image()}, CATALOG)
    assert exc.value.code == "invalid_workflow"
    assert exc.value.details == {"node_errors": {}}


def test_malformed_graph_fails_before_the_catalog_is_consulted() -> None:
    assert types_of({"3": save("99")}) == {"3": ["linked_node_missing"]}


# -- per-input errors -----------------------------------------------------------------------------


def test_required_input_missing() -> None:
    # transcript 03 (a)
    errors = errors_of({"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "lab/x"}}})
    assert errors == {
        "1": [
            {
                "type": "required_input_missing",
                "message": "required input 'images' is missing",
                "input": "images",
            }
        ]
    }


def test_below_min_and_not_in_list_are_both_reported() -> None:
    # transcript 03 (c)
    workflow = {
        "1": empty_image(width=0, height=64),
        "2": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "superres",
                "width": 8,
                "height": 8,
                "crop": "disabled",
            },
        },
        "3": save("2"),
    }
    errors = errors_of(workflow)
    assert errors["1"] == [
        {
            "type": "value_smaller_than_min",
            "message": "input 'width': value 0 is smaller than the minimum 1",
            "input": "width",
        }
    ]
    assert errors["2"][0]["type"] == "value_not_in_list"
    assert errors["2"][0]["input"] == "upscale_method"
    assert (
        "'superres' is not in ['nearest-exact', 'bilinear', 'area', 'bicubic', 'lanczos']"
        in errors["2"][0]["message"]
    )


def test_above_max() -> None:
    errors = errors_of({"1": empty_image(color=16777216), "2": save()})
    assert errors["1"] == [
        {
            "type": "value_bigger_than_max",
            "message": "input 'color': value 16777216 is bigger than the maximum 16777215",
            "input": "color",
        }
    ]


def test_float_range() -> None:
    workflow = {
        "1": empty_image(),
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 0.05}},
    }
    workflow["3"] = save("2")
    assert types_of(workflow) == {"2": ["value_smaller_than_min"]}


def test_not_in_list_for_the_v3_combo_spelling() -> None:
    workflow = {
        "1": empty_image(),
        "2": {
            "class_type": "SaveAnimatedWEBP",
            "inputs": {
                "images": ["1", 0],
                "filename_prefix": "a",
                "fps": 6.0,
                "lossless": True,
                "quality": 80,
                "method": "best",
            },
        },
    }
    assert types_of(workflow) == {"2": ["value_not_in_list"]}


def test_long_option_lists_are_not_echoed() -> None:
    info = {
        "Pick": {
            "input": {"required": {"name": [[f"m{i}.safetensors" for i in range(30)]]}},
            "output_node": True,
        }
    }
    errors = errors_of({"1": {"class_type": "Pick", "inputs": {"name": "other"}}}, info)
    assert errors["1"][0]["message"] == "input 'name': 'other' is not in a list of 30 options"


@pytest.mark.parametrize(
    ("class_type", "input_name", "value"),
    [
        ("EmptyImage", "width", "64"),  # ComfyUI would coerce the string
        ("EmptyImage", "width", 8.5),
        ("EmptyImage", "width", True),
        ("EmptyImage", "width", None),
        ("EmptyImage", "width", {"a": 1}),
        ("EmptyImage", "color", {"__value__": "red"}),
        ("ImageBlur", "sigma", "1.0"),
        ("SaveAnimatedWEBP", "lossless", "false"),  # bool("false") is True in ComfyUI
        ("SaveAnimatedWEBP", "lossless", 1),
        ("SaveImage", "filename_prefix", 5),
        ("SaveImage", "images", "not-a-link"),  # IMAGE only comes from a link
        ("ImageInvert", "image", asset()),  # core/ASSET only fits a file input
    ],
)
def test_wrong_primitive_type(class_type: str, input_name: str, value: object) -> None:
    base: dict[str, dict[str, Any]] = {
        "EmptyImage": empty_image(),
        "ImageBlur": {
            "class_type": "ImageBlur",
            "inputs": {"image": ["9", 0], "blur_radius": 1, "sigma": 1.0},
        },
        "SaveAnimatedWEBP": {
            "class_type": "SaveAnimatedWEBP",
            "inputs": {
                "images": ["9", 0],
                "filename_prefix": "a",
                "fps": 6.0,
                "lossless": True,
                "quality": 80,
                "method": "default",
            },
        },
        "SaveImage": save("9"),
        "ImageInvert": {"class_type": "ImageInvert", "inputs": {"image": ["9", 0]}},
    }
    node = base[class_type]
    node["inputs"][input_name] = value
    workflow = {"9": empty_image(), "1": node}
    if not CATALOG.is_output_node(class_type):
        workflow["2"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}
    errors = errors_of(workflow)
    (node_id,) = errors
    assert [(e["type"], e["input"]) for e in errors[node_id]] == [("invalid_input_type", input_name)]


def test_return_type_mismatch() -> None:
    # transcript 03 (e): LATENT linked into an IMAGE input
    workflow = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": save(),
    }
    assert errors_of(workflow) == {
        "3": [
            {
                "type": "return_type_mismatch",
                "message": (
                    "input 'images': expects IMAGE but output 0 of node 1 (EmptyLatentImage) is LATENT"
                ),
                "input": "images",
            }
        ]
    }


def test_link_to_a_missing_output_index() -> None:
    assert errors_of({"1": empty_image(), "2": save("1", 1)}) == {
        "2": [
            {
                "type": "linked_output_missing",
                "message": "input 'images': links to output 1 of node 1 (EmptyImage), which has 1 output(s)",
                "input": "images",
            }
        ]
    }


def test_errors_from_several_nodes_arrive_together() -> None:
    workflow = txt2img()
    workflow["3"]["inputs"]["steps"] = 0
    workflow["3"]["inputs"]["sampler_name"] = "nope"
    workflow["8"]["inputs"]["vae"] = ["4", 1]  # CLIP into VAE
    del workflow["6"]["inputs"]["text"]
    assert types_of(workflow) == {
        "3": ["value_smaller_than_min", "value_not_in_list"],
        "6": ["required_input_missing"],
        "8": ["return_type_mismatch"],
    }


def test_only_nodes_an_output_depends_on_are_checked() -> None:
    # As in ComfyUI: a dangling branch never runs, so its values do not matter; its class still does.
    workflow = {"1": empty_image(), "2": save(), "3": empty_image(width=0)}
    validate_against_catalog(workflow, CATALOG)


# -- type rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("received", "expected", "compatible"),
    [
        ("IMAGE", "IMAGE", True),
        ("LATENT", "IMAGE", False),
        ("IMAGE", "IMAGE,MASK", True),
        ("STRING,INT", "INT,FLOAT", True),
        ("STRING,BOOLEAN", "INT,FLOAT", False),
        ("*", "MODEL", True),
        ("MODEL", "*", True),
        ("COMFY_MATCHTYPE_V3", "IMAGE", True),
        ("COMBO", "COMBO", True),
        ("STRING", "COMBO", False),
    ],
)
def test_types_compatible(received: str, expected: str, compatible: bool) -> None:
    assert types_compatible(received, expected) is compatible


SYNTHETIC = {
    "ModelList": {
        "input": {"required": {}},
        "output": [["a.safetensors", "b.safetensors"], "STRING"],
        "output_node": False,
    },
    "Loader": {
        "input": {
            "required": {
                "name": [["a.safetensors", "b.safetensors"]],
                "grow": ["COMFY_AUTOGROW_V3", {"template": {}}],
            },
            "optional": {
                "strength": ["FLOAT", {"min": 0.0, "max": 1.0}],
                "tags": ["COMBO", {"options": ["x", "y"], "multi_select": True}],
            },
        },
        "output": ["MODEL"],
        "output_node": True,
    },
}


def test_combo_outputs_link_into_combo_inputs() -> None:
    workflow: dict[str, Any] = {
        "1": {"class_type": "ModelList", "inputs": {}},
        "2": {"class_type": "Loader", "inputs": {"name": ["1", 0]}},
    }
    validate_against_catalog(workflow, SYNTHETIC)
    workflow["2"]["inputs"]["name"] = ["1", 1]
    assert types_of(workflow, SYNTHETIC) == {"2": ["return_type_mismatch"]}


def test_optional_inputs_are_checked_when_given_and_dynamic_inputs_are_skipped() -> None:
    workflow: dict[str, Any] = {"2": {"class_type": "Loader", "inputs": {"name": "a.safetensors"}}}
    validate_against_catalog(workflow, SYNTHETIC)
    workflow["2"]["inputs"] |= {"strength": 2.0, "tags": {"__value__": ["x", "z"]}}
    assert types_of(workflow, SYNTHETIC) == {"2": ["value_bigger_than_max", "value_not_in_list"]}
    workflow["2"]["inputs"] |= {"strength": 0.5, "tags": {"__value__": ["x", "y"]}}
    validate_against_catalog(workflow, SYNTHETIC)


# -- NodeCatalog ----------------------------------------------------------------------------------


def test_catalog_helpers() -> None:
    assert "KSampler" in CATALOG and "NoSuchNode" not in CATALOG
    assert {"EmptyImage", "SaveImage", "LoadImage"} <= CATALOG.class_names
    assert CATALOG.is_output_node("SaveImage") and not CATALOG.is_output_node("EmptyImage")
    assert CATALOG.output_types("CheckpointLoaderSimple") == ("MODEL", "CLIP", "VAE")
    assert CATALOG.output_types("NoSuchNode") == ()
    assert CATALOG.inputs("ImageScale")["crop"] == InputSpec(
        "crop", True, "COMBO", ("disabled", "center"), {}
    )
    method = CATALOG.inputs("SaveAnimatedWEBP")["method"]
    assert (method.type, method.options) == ("COMBO", ("default", "fastest", "slowest"))
    assert CATALOG.inputs("NoSuchNode") == {}


def test_catalog_file_inputs_come_from_upload_flags_and_the_known_list() -> None:
    assert CATALOG.file_inputs("LoadImage") == {"image"}
    assert CATALOG.file_inputs("LoadImageMask") == {"image"}
    assert CATALOG.file_inputs("LoadImageOutput") == {"image"}
    assert CATALOG.file_inputs("LoadAudio") == {"audio"}
    assert CATALOG.file_inputs("LoadVideo") == {"file"}
    assert CATALOG.file_inputs("LoadLatent") == {"latent"}  # no upload flag in object_info
    assert CATALOG.file_inputs("CheckpointLoaderSimple") == frozenset()  # models are shared, not files


def test_catalog_policy() -> None:
    policy = CATALOG.policy()
    assert policy.catalog_classes == CATALOG.class_names
    assert policy.denied == DEFAULT_DENIED
    assert policy.is_file_input("LoadAudio", "audio") and policy.is_file_input("VHS_LoadVideo", "video")
    assert {"SaveImage", "SaveAnimatedWEBP", "SaveLatent"} <= policy.prefix_classes
    assert policy.class_problem("NoSuchNode") == (
        "unknown_node_class",
        "node class 'NoSuchNode' does not exist on this worker",
    )
    assert policy.class_problem("LoadImageOutput") is not None
    assert policy.class_problem("KSampler") is None
    narrow = CATALOG.policy(allowed=frozenset({"KSampler"}), denied=frozenset())
    assert narrow.class_problem("LoadImageOutput") == (
        "node_class_not_allowed",
        "node class 'LoadImageOutput' is not in the allowed set",
    )


def test_catalog_tolerates_odd_object_info_entries() -> None:
    catalog = NodeCatalog(
        {"Broken": "x", "NoInputs": {"output": "IMAGE"}, "Weird": {"input": {"required": {"a": 5, "b": []}}}}
    )
    assert catalog.class_names == {"NoInputs", "Weird"}
    assert catalog.output_types("NoInputs") == ()
    assert {spec.type for spec in catalog.inputs("Weird").values()} == {"*"}
