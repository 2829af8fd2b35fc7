"""Workflow graph shape, asset references, node policy and the run-time rewrite (worker/comfy/graph.py).

Graphs follow the ComfyUI 0.8.0 transcripts in shared/comfyui/transcripts (02: LoadImage → ImageInvert
→ ImageScale → SaveImage; 03: the validation-error cases), with the LoadImage input replaced by the
``core/ASSET`` object the official SDK sends.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from comfyfleet.errors import ValidationFailed
from comfyfleet.filenames import sanitize_filename
from comfyfleet.worker.comfy.graph import AssetRef, find_asset_refs, validate_api_format
from comfyfleet.worker.comfy.policy import DEFAULT_DENIED, NodePolicy, check_policy
from comfyfleet.worker.comfy.rewrite import prepare_for_run

HASH = "blake3:" + "ab" * 32
JOB_PREFIX = "jobs/job-1"
STAGED = {"asset-1": "jobs/job-1/in/photo.png"}


def asset(asset_id: str = "asset-1", **info: Any) -> dict[str, Any]:
    return {"__type": "core/ASSET", "info": {"id": asset_id, **info}}


_DEFAULT_IMAGE = object()


def invert_graph(image: object = _DEFAULT_IMAGE, prefix: object = "lab/inverted") -> dict[str, Any]:
    if image is _DEFAULT_IMAGE:
        image = asset(hash=HASH, file_path="photo.png")
    return {
        "10": {"class_type": "LoadImage", "inputs": {"image": image}},
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
        "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": prefix}},
    }


def node_errors(exc: pytest.ExceptionInfo[ValidationFailed]) -> dict[str, list[str]]:
    """node id → error types, from the details shape every ValidationFailed here carries."""
    details = exc.value.details
    return {
        node_id: [error["type"] for error in errors] for node_id, errors in details["node_errors"].items()
    }


def prepare(workflow: object, **overrides: Any) -> dict[str, dict[str, Any]]:
    options: dict[str, Any] = {"staged_inputs": STAGED, "output_prefix": JOB_PREFIX, "policy": NodePolicy()}
    return prepare_for_run(workflow, **(options | overrides))


# -- validate_api_format: the graph as a whole ----------------------------------------------------


def test_valid_graph_is_returned_as_is() -> None:
    graph = invert_graph()
    assert validate_api_format(graph, max_nodes=10) is graph


@pytest.mark.parametrize("workflow", [None, [], "graph", 3, [{"class_type": "SaveImage"}]])
def test_non_object_workflow_is_invalid(workflow: object) -> None:
    with pytest.raises(ValidationFailed) as exc:
        validate_api_format(workflow, max_nodes=10)
    assert exc.value.code == "invalid_workflow"
    assert exc.value.status_code == 422
    assert exc.value.details == {"node_errors": {}}


def test_empty_workflow_is_invalid() -> None:
    with pytest.raises(ValidationFailed, match="no nodes") as exc:
        validate_api_format({}, max_nodes=10)
    assert exc.value.code == "invalid_workflow"


def test_ui_export_is_refused_with_its_own_code() -> None:
    ui_export = {
        "last_node_id": 2,
        "last_link_id": 1,
        "nodes": [{"id": 1, "type": "EmptyImage", "widgets_values": [64, 64, 1, 0]}],
        "links": [[1, 1, 0, 2, 0, "IMAGE"]],
        "groups": [],
        "version": 0.4,
    }
    with pytest.raises(ValidationFailed, match="Save \\(API Format\\)") as exc:
        validate_api_format(ui_export, max_nodes=10)
    assert exc.value.code == "workflow_format_ui"
    assert exc.value.status_code == 422


def test_graph_wrapped_in_a_prompt_key_gets_a_hint() -> None:
    with pytest.raises(ValidationFailed, match="wrapped in a 'prompt' key") as exc:
        validate_api_format({"prompt": invert_graph()}, max_nodes=10)
    assert exc.value.code == "invalid_workflow"


def test_too_many_nodes() -> None:
    graph = invert_graph()
    assert validate_api_format(graph, max_nodes=4) is graph
    with pytest.raises(ValidationFailed) as exc:
        validate_api_format(graph, max_nodes=3)
    assert exc.value.code == "too_many_nodes"
    assert exc.value.status_code == 422
    assert exc.value.details == {"node_count": 4, "max_nodes": 3}


# -- validate_api_format: malformed nodes ---------------------------------------------------------


def test_malformed_nodes_are_all_reported_per_node() -> None:
    workflow = {
        "1": {"inputs": {}},  # transcript 03 (i): no class_type
        "2": "SaveImage",
        "3": {"class_type": "SaveImage"},
        "4": {"class_type": "", "inputs": {}},
        "5": {"class_type": "SaveImage", "inputs": [], "_meta": "title"},
        "6": {"class_type": "EmptyImage", "inputs": {"width": 64}},
    }
    with pytest.raises(ValidationFailed) as exc:
        validate_api_format(workflow, max_nodes=10)
    assert exc.value.code == "invalid_workflow"
    assert node_errors(exc) == {
        "1": ["invalid_class_type"],
        "2": ["invalid_node"],
        "3": ["invalid_inputs"],
        "4": ["invalid_class_type"],
        "5": ["invalid_node", "invalid_inputs"],
    }
    assert str(exc.value).startswith("Node 1 (unknown class): node is missing the class_type property")
    assert "(and 5 more errors)" in str(exc.value)


def test_oversized_node_ids_and_empty_input_names_are_invalid() -> None:
    long_id = "n" * 200
    workflow = {
        long_id: {"class_type": "SaveImage", "inputs": {}},
        "1": {"class_type": "X", "inputs": {"": 1}},
    }
    with pytest.raises(ValidationFailed) as exc:
        validate_api_format(workflow, max_nodes=10)
    # The echoed id is cut short: details must not carry megabytes back to the caller.
    assert node_errors(exc) == {"1": ["invalid_input_name"], "n" * 128 + "…": ["invalid_node_id"]}


def test_error_details_name_the_input_and_sort_node_ids_numerically() -> None:
    workflow = {
        "10": {"class_type": "SaveImage", "inputs": {"images": ["99", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["98", 0]}},
    }
    with pytest.raises(ValidationFailed) as exc:
        validate_api_format(workflow, max_nodes=10)
    details = exc.value.details["node_errors"]
    assert list(details) == ["9", "10"]
    assert details["9"] == [
        {
            "type": "linked_node_missing",
            "message": "input 'images' links to node '98', which is not in the workflow",
            "input": "images",
        }
    ]


def test_dangling_link_is_reported() -> None:
    # transcript 03 (d): ComfyUI answers with a KeyError traceback instead.
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["99", 0], "filename_prefix": "lab/x"}},
    }
    with pytest.raises(ValidationFailed) as exc:
        validate_api_format(workflow, max_nodes=10)
    assert node_errors(exc) == {"3": ["linked_node_missing"]}
    assert exc.value.details["node_errors"]["3"][0]["input"] == "images"


@pytest.mark.parametrize(
    "link",
    [[], ["1"], ["1", 0, 0], [1, 0], ["1", "0"], ["1", -1], ["1", True], ["1", 0.0], [None, None]],
)
def test_malformed_links_are_bad_linked_input(link: list[Any]) -> None:
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8}},
        "2": {"class_type": "SaveImage", "inputs": {"images": link}},
    }
    with pytest.raises(ValidationFailed) as exc:
        validate_api_format(workflow, max_nodes=10)
    assert node_errors(exc) == {"2": ["bad_linked_input"]}


def test_literal_lists_pass_inside_a_value_wrapper() -> None:
    workflow = {"1": {"class_type": "Custom", "inputs": {"choices": {"__value__": ["a", "b"]}}}}
    assert validate_api_format(workflow, max_nodes=10) is workflow


def test_dependency_cycles_name_only_the_nodes_on_the_cycle() -> None:
    workflow = {
        "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}},
        "4": {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}},
    }
    with pytest.raises(ValidationFailed) as exc:
        validate_api_format(workflow, max_nodes=10)
    assert node_errors(exc) == {
        "1": ["dependency_cycle"],
        "2": ["dependency_cycle"],
        "4": ["dependency_cycle"],
    }


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), {"__type": "core/IMAGE", "info": {}}, object(), b"bytes"],
)
def test_values_json_cannot_carry_are_invalid(value: object) -> None:
    workflow = {"1": {"class_type": "EmptyImage", "inputs": {"width": value}}}
    with pytest.raises(ValidationFailed) as exc:
        validate_api_format(workflow, max_nodes=10)
    assert node_errors(exc) == {"1": ["invalid_input_type"]}


def test_deeply_nested_values_are_refused() -> None:
    value: object = "leaf"
    for _ in range(40):
        value = {"k": value}
    with pytest.raises(ValidationFailed) as exc:
        validate_api_format({"1": {"class_type": "Custom", "inputs": {"deep": value}}}, max_nodes=10)
    assert node_errors(exc) == {"1": ["invalid_input_type"]}


@pytest.mark.parametrize(
    "reference",
    [
        {"__type": "core/ASSET"},
        {"__type": "core/ASSET", "info": "asset-1"},
        {"__type": "core/ASSET", "info": {}},
        {"__type": "core/ASSET", "info": {"id": ""}},
        {"__type": "core/ASSET", "info": {"id": 7}},
        {"__type": "core/ASSET", "info": {"id": "a", "hash": "sha256:" + "ab" * 32}},
        {"__type": "core/ASSET", "info": {"id": "a", "hash": "blake3:" + "AB" * 32}},
        {"__type": "core/ASSET", "info": {"id": "a", "file_path": ["photo.png"]}},
    ],
)
def test_malformed_asset_references_are_missing_asset(reference: dict[str, Any]) -> None:
    with pytest.raises(ValidationFailed) as exc:
        validate_api_format(invert_graph(image=reference), max_nodes=10)
    assert exc.value.code == "missing_asset"
    assert exc.value.status_code == 422
    assert node_errors(exc) == {"10": ["invalid_asset_reference"]}


# -- find_asset_refs ------------------------------------------------------------------------------


def test_find_asset_refs_reads_the_sdk_reference() -> None:
    assert find_asset_refs(invert_graph()) == [
        AssetRef(node_id="10", input="image", asset_id="asset-1", hash=HASH, file_path="photo.png")
    ]


def test_find_asset_refs_hints_are_optional_and_nested_refs_are_found() -> None:
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": asset("a")}},
        "2": {"class_type": "Custom", "inputs": {"frames": {"__value__": ["x", asset("b")]}, "in": ["1", 0]}},
    }
    assert find_asset_refs(workflow) == [
        AssetRef("1", "image", "a", None, None),
        AssetRef("2", "frames", "b", None, None, path=("__value__", 1)),
    ]


def test_find_asset_refs_on_a_graph_without_assets() -> None:
    assert find_asset_refs(invert_graph(image="photo.png")) == []


def test_find_asset_refs_validates_first() -> None:
    with pytest.raises(ValidationFailed):
        find_asset_refs({"1": {"class_type": "LoadImage", "inputs": {"image": {"__type": "core/ASSET"}}}})


# -- sanitize_filename ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("photo.png", "photo.png"),
        ("my photo (1).png", "my photo (1).png"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\cat.jpg", "cat.jpg"),
        ("/abs/path/x.webp", "x.webp"),
        ("..", "file"),
        ("...", "file"),
        ("", "file"),
        ("dir/", "file"),
        (".bashrc", "bashrc"),
        ("a\x00b\nc.png", "abc.png"),
        ("\u202egnp.exe", "gnp.exe"),  # a right-to-left override would disguise the extension
        ("zero\u200bwidth.png", "zerowidth.png"),
        ("x.png [output]", "x.png _output_"),  # ComfyUI reads "name [output]" from the output folder
        ('a<b>c:d"e|f?g*h.png', "a_b_c_d_e_f_g_h.png"),
        ("  spaced   out  .png ", "spaced out .png"),
        ("日本語.png", "日本語.png"),
        ("img_%width%x%height%", "img_%width%x%height%"),
    ],
)
def test_sanitize_filename(name: str, expected: str) -> None:
    assert sanitize_filename(name) == expected


def test_sanitize_filename_bounds_bytes_and_keeps_the_extension() -> None:
    ascii_name = sanitize_filename("a" * 300 + ".png")
    assert ascii_name.endswith(".png") and len(ascii_name.encode()) == 120
    wide = sanitize_filename("é" * 200 + ".jpeg", max_bytes=50)
    assert wide.endswith(".jpeg") and len(wide.encode()) <= 50
    wide.encode().decode()  # still valid UTF-8: no character was cut in half
    no_extension = sanitize_filename("b" * 300)
    assert no_extension == "b" * 120


def test_sanitize_filename_default_is_configurable() -> None:
    assert sanitize_filename("../..", default="out") == "out"


# -- prepare_for_run: the rewrite -----------------------------------------------------------------


def test_assets_become_staged_names_and_the_input_graph_is_untouched() -> None:
    workflow = invert_graph()
    before = copy.deepcopy(workflow)
    prepared = prepare(workflow)
    assert workflow == before
    assert prepared["10"] == {"class_type": "LoadImage", "inputs": {"image": "jobs/job-1/in/photo.png"}}
    assert prepared["11"]["inputs"]["image"] == ["10", 0]
    assert prepared["11"]["inputs"]["image"] is not workflow["11"]["inputs"]["image"]
    assert prepared["12"] == workflow["12"]
    assert prepared["13"]["inputs"] == {"images": ["12", 0], "filename_prefix": "jobs/job-1/inverted"}


def test_only_class_type_inputs_and_meta_survive() -> None:
    workflow = invert_graph()
    workflow["11"]["_meta"] = {"title": "Invert"}
    workflow["11"]["is_changed"] = ["forced"]  # ComfyUI would use this as the cache key
    prepared = prepare(workflow)
    assert prepared["11"] == {
        "class_type": "ImageInvert",
        "inputs": {"image": ["10", 0]},
        "_meta": {"title": "Invert"},
    }


def test_nested_assets_in_other_inputs_are_substituted() -> None:
    workflow = invert_graph()
    workflow["14"] = {"class_type": "Custom", "inputs": {"frames": {"__value__": [asset()]}}}
    assert prepare(workflow)["14"]["inputs"] == {"frames": {"__value__": ["jobs/job-1/in/photo.png"]}}


@pytest.mark.parametrize(
    ("original", "forced"),
    [
        ("lab/inverted", "jobs/job-1/inverted"),
        ("ComfyUI", "jobs/job-1/ComfyUI"),
        ("../../etc/x", "jobs/job-1/x"),
        ("%year%/..", "jobs/job-1/out"),
        ("..", "jobs/job-1/out"),
        ("/etc/cron.d/evil", "jobs/job-1/evil"),
        ("jobs/other-job/out", "jobs/job-1/out"),
        ("C:\\temp\\y", "jobs/job-1/y"),
        (
            "lab/%year%-%month%-%day%/img_%width%x%height%_b%batch_num%",
            "jobs/job-1/img_%width%x%height%_b%batch_num%",
        ),
        ("", "jobs/job-1/out"),
        (None, "jobs/job-1/out"),
        (12, "jobs/job-1/out"),
        ({"__value__": "a/b"}, "jobs/job-1/b"),
        (["20", 0], "jobs/job-1/out"),  # a linked prefix would be computed at run time
    ],
)
def test_filename_prefix_is_forced_into_the_job_folder(original: object, forced: str) -> None:
    workflow = invert_graph(prefix=original)
    workflow["20"] = {"class_type": "PrimitiveString", "inputs": {"value": "../../x"}}
    assert prepare(workflow)["13"]["inputs"]["filename_prefix"] == forced


def test_filename_prefix_is_forced_on_any_node_and_added_where_it_defaults() -> None:
    workflow = invert_graph()
    del workflow["13"]["inputs"]["filename_prefix"]
    workflow["14"] = {
        "class_type": "VHS_VideoCombine",
        "inputs": {"images": ["12", 0], "filename_prefix": "v/a"},
    }
    workflow["15"] = {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}}
    prepared = prepare(workflow)
    assert prepared["13"]["inputs"]["filename_prefix"] == "jobs/job-1/out"
    assert prepared["14"]["inputs"]["filename_prefix"] == "jobs/job-1/a"
    assert "filename_prefix" not in prepared["15"]["inputs"]


def test_strings_in_other_inputs_are_left_alone() -> None:
    workflow = invert_graph()
    workflow["14"] = {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "../../etc/passwd", "clip": ["12", 0]},
    }
    assert prepare(workflow)["14"]["inputs"]["text"] == "../../etc/passwd"


@pytest.mark.parametrize(
    "output_prefix", ["", "/jobs/a", "jobs/../x", "jobs//a", "jobs\\a", "jobs/a/", "./a", "a]"]
)
def test_bad_output_prefix_is_a_caller_bug(output_prefix: str) -> None:
    with pytest.raises(ValueError, match="output_prefix"):
        prepare(invert_graph(), output_prefix=output_prefix)


@pytest.mark.parametrize("staged_name", ["../in/x.png", "/abs/x.png", "x.png [output]", ""])
def test_bad_staged_name_is_a_caller_bug(staged_name: str) -> None:
    with pytest.raises(ValueError, match="staged input name"):
        prepare(invert_graph(), staged_inputs={"asset-1": staged_name})


def test_asset_that_was_not_staged_is_missing_asset() -> None:
    with pytest.raises(ValidationFailed) as exc:
        prepare(invert_graph(), staged_inputs={"other-asset": "jobs/job-1/in/other.png"})
    assert exc.value.code == "missing_asset"
    assert exc.value.details["node_errors"]["10"][0]["type"] == "asset_not_staged"
    assert exc.value.details["node_errors"]["10"][0]["input"] == "image"


# -- prepare_for_run: file references -------------------------------------------------------------


@pytest.mark.parametrize(
    "reference",
    [
        "does_not_exist.png",  # transcript 03 (j)
        "lab/lab_upload.png",  # transcript 02: another upload in the shared input folder
        "jobs/job-2/in/photo.png",  # another job's staged input
        "../x.png",
        "../../../../etc/passwd",
        "/etc/passwd",
        "subfolder/other.png",
        "jobs/job-1/in/photo.png [output]",  # ComfyUI would read it from the output folder
        "jobs/job-1/in/../../job-2/in/photo.png",
        "",
        ["20", 0],  # computed at run time, e.g. by a string node
        {"__value__": "jobs/job-1/in/photo.png"},
        7,
        None,
    ],
)
def test_foreign_file_references_are_refused(reference: object) -> None:
    workflow = invert_graph(image=reference)
    workflow["20"] = {"class_type": "PrimitiveString", "inputs": {"value": "x.png"}}
    with pytest.raises(ValidationFailed) as exc:
        prepare(workflow)
    assert exc.value.code == "invalid_workflow"
    ((error,),) = exc.value.details["node_errors"].values()
    assert list(exc.value.details["node_errors"]) == ["10"]
    assert (error["type"], error["input"]) == ("file_reference_not_allowed", "image")
    assert error["message"].startswith("input 'image': ")
    assert str(exc.value).startswith("Node 10 (LoadImage): input 'image': ")


def test_the_jobs_own_staged_name_is_accepted_as_a_plain_string() -> None:
    prepared = prepare(invert_graph(image="jobs/job-1/in/photo.png"))
    assert prepared["10"]["inputs"]["image"] == "jobs/job-1/in/photo.png"


@pytest.mark.parametrize(
    ("class_type", "input_name"),
    [
        ("LoadImageMask", "image"),
        ("LoadVideo", "file"),
        ("LoadAudio", "audio"),
        ("LoadLatent", "latent"),
        ("VHS_LoadVideo", "video"),
        ("WebcamCapture", "image"),
    ],
)
def test_known_file_inputs_are_guarded_without_a_catalog(class_type: str, input_name: str) -> None:
    workflow = invert_graph()
    workflow["14"] = {
        "class_type": class_type,
        "inputs": {input_name: "../../secret.bin", "channel": "alpha"},
    }
    with pytest.raises(ValidationFailed) as exc:
        prepare(workflow)
    assert node_errors(exc) == {"14": ["file_reference_not_allowed"]}
    workflow["14"]["inputs"][input_name] = asset()
    assert prepare(workflow)["14"]["inputs"][input_name] == "jobs/job-1/in/photo.png"


# -- node policy ----------------------------------------------------------------------------------


def test_default_deny_list_refuses_nodes_that_read_outside_the_job() -> None:
    assert {"LoadImageOutput", "SaveImageDataSetToFolder", "CheckpointSave"} <= DEFAULT_DENIED
    assert not {"SaveLatent", "LoadLatent", "SaveImageWebsocket", "PreviewImage"} & DEFAULT_DENIED
    workflow = invert_graph()
    workflow["14"] = {"class_type": "LoadImageOutput", "inputs": {"image": asset()}}
    with pytest.raises(ValidationFailed) as exc:
        prepare(workflow)
    assert node_errors(exc) == {"14": ["node_class_denied"]}


def test_allowed_set_and_catalog_bound_the_classes() -> None:
    policy = NodePolicy(
        allowed=frozenset({"LoadImage", "ImageInvert", "ImageScale", "SaveImage", "NotInstalled"}),
        catalog_classes=frozenset({"LoadImage", "ImageScale", "SaveImage", "ImageInvert"}),
    )
    workflow = invert_graph()
    workflow["14"] = {"class_type": "ImageBlur", "inputs": {"image": ["12", 0]}}
    workflow["15"] = {"class_type": "NotInstalled", "inputs": {}}
    with pytest.raises(ValidationFailed) as exc:
        prepare(workflow, policy=policy)
    assert node_errors(exc) == {"14": ["node_class_not_allowed"], "15": ["unknown_node_class"]}


def test_deny_list_wins_over_the_allowed_set() -> None:
    policy = NodePolicy(
        allowed=frozenset({"LoadImage", "ImageInvert", "ImageScale", "SaveImage"}),
        denied=frozenset({"ImageInvert"}),
    )
    with pytest.raises(ValidationFailed) as exc:
        prepare(invert_graph(), policy=policy)
    assert node_errors(exc) == {"11": ["node_class_denied"]}


def test_policy_errors_are_collected_across_nodes() -> None:
    workflow = invert_graph(image="../x.png")
    workflow["14"] = {"class_type": "LoadImageOutput", "inputs": {"image": "ComfyUI_00001_.png"}}
    with pytest.raises(ValidationFailed) as exc:
        prepare(workflow)
    assert node_errors(exc) == {
        "10": ["file_reference_not_allowed"],
        "14": ["node_class_denied", "file_reference_not_allowed"],
    }
    assert "(and 2 more errors)" in str(exc.value)


def test_check_policy_at_submit_accepts_assets_and_refuses_file_names() -> None:
    check_policy(invert_graph(), NodePolicy())
    with pytest.raises(ValidationFailed) as exc:
        check_policy(invert_graph(image="photo.png"), NodePolicy())
    assert node_errors(exc) == {"10": ["file_reference_not_allowed"]}
    check_policy(
        invert_graph(image="jobs/job-1/in/photo.png"), NodePolicy(), staged_names={"jobs/job-1/in/photo.png"}
    )


def test_prepare_for_run_rejects_a_malformed_graph_before_rewriting() -> None:
    with pytest.raises(ValidationFailed) as exc:
        prepare({"1": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}}})
    assert node_errors(exc) == {"1": ["linked_node_missing"]}
