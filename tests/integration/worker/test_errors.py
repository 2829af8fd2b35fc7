"""How a bad workflow ends: refused at submit against the node catalog the workers published (422
``invalid_workflow`` with per-node details, no job created), refused by ComfyUI's own validation
(a failed job with ComfyUI's per-node details), or failing while it runs (a failed job naming the
node, its class and the message)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.worker.conftest import Service
from tests.integration.worker.helpers import (
    comfy_saw_prompt,
    forget_catalog,
    load_image,
    node_error_types,
    upload_asset,
)
from tests.support.workflows import empty_image_save

SAVE = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
INVALID: dict[str, tuple[dict[str, Any], str, str]] = {
    "unknown class": (
        {"1": {"class_type": "NoSuchNode", "inputs": {}}, "2": SAVE},
        "1",
        "unknown_node_class",
    ),
    "missing input": (
        {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}},
        "1",
        "required_input_missing",
    ),
    "out of range": (empty_image_save(width=0), "1", "value_smaller_than_min"),
    "not in list": (
        {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
            },
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
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
        },
        "2",
        "value_not_in_list",
    ),
    "wrong link type": (
        {
            "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "2": SAVE,
        },
        "2",
        "return_type_mismatch",
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
async def test_submit_validates_against_the_published_catalog(service: Service, case: str) -> None:
    workflow, node_id, error_type = INVALID[case]
    response = await service.http.post("/api/v2/jobs", json={"workflow": workflow})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_workflow"
    assert error_type in node_error_types(error["details"], node_id), error
    listed = await service.http.get("/api/v2/jobs")
    assert listed.json()["jobs"] == []  # no job was created
    if service.target.standin is not None:
        assert service.target.standin.log.prompts == []


async def test_comfyui_validation_errors_become_job_errors_with_per_node_details(service: Service) -> None:
    await forget_catalog(service.runtime)  # as if the published catalog were stale: only ComfyUI can tell
    job = await service.jobs.submit(empty_image_save(width=0))
    final = await service.jobs.wait_terminal(job["id"])
    assert final["status"] == "failed"
    error = final["error"]
    assert error["code"] == "invalid_workflow"
    (problem,) = error["details"]["node_errors"]["1"]
    assert problem["type"] == "value_smaller_than_min" and problem["input"] == "width", problem
    assert error["details"]["comfyui_node_errors"]["1"]["class_type"] == "EmptyImage"
    assert await comfy_saw_prompt(service.target, job["id"])  # ComfyUI refused it; nothing ran


async def test_runtime_errors_fail_the_job_with_node_class_and_message(service: Service) -> None:
    info = await upload_asset(
        service.http, b"this is not an image\n", filename="notes.txt", content_type="text/plain"
    )
    job = await service.jobs.submit(load_image({"__type": "core/ASSET", "info": info}))
    final = await service.jobs.wait_terminal(job["id"])
    assert final["status"] == "failed", final
    error = final["error"]
    assert error["code"] == "node_execution_error"
    assert error["node_id"] == "1" and error["class_type"] == "LoadImage", error
    assert "UnidentifiedImageError" in error["message"], error
    assert error["traceback"]
    assert final["metrics"]["attempts"] == 1  # a node error is final, not retried
