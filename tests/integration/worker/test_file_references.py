"""Multi-tenant isolation on a shared worker: a workflow may only read the job's own staged inputs.
Any other file name (another job's input, ``../``, an absolute path, a sub-folder, ComfyUI's
``[output]`` annotation) and any denied node class is refused before the prompt reaches ComfyUI:
at submit (422) or, when only the worker can tell, as a failed job with per-node details."""

from __future__ import annotations

from typing import Any

from tests.integration.worker.conftest import Service, StartService
from tests.integration.worker.helpers import (
    comfy_saw_prompt,
    forget_catalog,
    load_image,
    node_error_types,
    png_bytes,
    upload_asset,
)

ASSET = "core/ASSET"


async def refused(service: Service, workflow: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Submit ``workflow`` and return how it was refused: ("submit", error) or ("job", job error)."""
    response = await service.http.post("/api/v2/jobs", json={"workflow": workflow})
    if response.status_code == 422:
        return "submit", response.json()["error"]
    assert response.status_code == 201, response.text
    job = await service.jobs.wait_terminal(response.json()["id"])
    assert job["status"] == "failed", job
    assert job["outputs"] == []
    assert not await comfy_saw_prompt(service.target, job["id"])
    return "job", job["error"]


async def test_file_names_the_job_does_not_own_are_refused_before_comfyui(service: Service) -> None:
    # A neighbour's job with a staged input: its path is what a hostile workflow would try to read.
    neighbour = await service.other_tenant_client()
    async with neighbour:
        info = await upload_asset(neighbour, png_bytes(), filename="private.png", content_type="image/png")
        response = await neighbour.post(
            "/api/v2/jobs", json={"workflow": load_image({"__type": ASSET, "info": info})}
        )
        assert response.status_code == 201, response.text
        other_id = response.json()["id"]
    assert (await service.runtime_job_status(other_id)) == "succeeded"

    names = [
        f"jobs/{other_id}/in/00_private.png",
        "../x.png",
        "../../etc/passwd",
        "/etc/passwd",
        "subfolder/other.png",
        "private.png [output]",
        {"__value__": f"jobs/{other_id}/in/00_private.png"},
    ]
    for name in names:
        where, error = await refused(service, load_image(name))
        assert error["code"] == "invalid_workflow", (name, error)
        problems = error["details"]["node_errors"]["1"]
        assert [p["input"] for p in problems] == ["image"], (name, where, error)
        if isinstance(name, str):  # a plain name passes the catalog; the worker's policy refuses it
            assert problems[0]["type"] == "file_reference_not_allowed", (name, where, error)


async def test_another_tenants_asset_is_a_missing_asset(service: Service) -> None:
    neighbour = await service.other_tenant_client()
    async with neighbour:
        info = await upload_asset(neighbour, png_bytes(), filename="theirs.png", content_type="image/png")
    response = await service.http.post(
        "/api/v2/jobs", json={"workflow": load_image({"__type": ASSET, "info": info})}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "missing_asset"


async def test_a_denied_node_class_never_reaches_comfyui(start_service: StartService) -> None:
    # ImageInvert is harmless, but this deployment denies it in its settings.
    service = await start_service(node_deny=["ImageInvert"])
    info = await upload_asset(service.http, png_bytes(), filename="mine.png", content_type="image/png")
    where, error = await refused(service, load_image({"__type": ASSET, "info": info}))
    assert error["code"] == "invalid_workflow", error
    assert "node_class_denied" in node_error_types(error["details"], "2"), (where, error)


async def test_built_in_denied_classes_are_refused_even_without_a_catalog(service: Service) -> None:
    # LoadImageOutput reads ComfyUI's shared output folder: every tenant's results. Without a
    # published catalog the submission is not checked, so the worker's own policy must refuse it.
    await forget_catalog(service.runtime)
    workflow = {
        "1": {"class_type": "LoadImageOutput", "inputs": {"image": "ComfyUI_00001_.png [output]"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    where, error = await refused(service, workflow)
    assert where == "job" and error["code"] == "invalid_workflow", error
    assert "node_class_denied" in node_error_types(error["details"], "1"), error
