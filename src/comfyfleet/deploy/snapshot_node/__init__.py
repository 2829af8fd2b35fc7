"""comfyfleet's ComfyUI helper node for Modal memory snapshots.

Copy this folder into ``<ComfyUI>/custom_nodes/`` (e.g. as ``comfyfleet_snapshot``) and start ComfyUI
with ``COMFYFLEET_SNAPSHOT_MODE=1`` inside ``@modal.enter(snap=True)``:

- ``prestartup_script.py`` installs the patch before ComfyUI imports ``comfy.*`` (see ``patch.py``);
  ComfyUI then starts on the CPU, and refuses to start when its ``get_torch_device`` is not the one
  the patch was written for;
- this module, loaded later as a node package, adds the routes the worker calls from
  ``@modal.enter(snap=False)``: ``POST /comfyfleet/snapshot/restore`` (optional JSON body
  ``{"cuda_visible_devices": "..."}``) binds the GPU and answers ``{"patched", "device",
  "comfyui_version"}``, or 500 with ``{"error"}`` when CUDA is still missing;
  ``GET /comfyfleet/snapshot/status`` shows the state.

It adds no node classes. Imported outside ComfyUI (by the worker or the tests) it registers nothing.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .patch import (
    ENV_VAR,
    RESTORE_PATH,
    STATUS_PATH,
    RebindResult,
    SnapshotPatchError,
    install,
    rebind_gpu,
    snapshot_state,
)

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "ENV_VAR",
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "RESTORE_PATH",
    "STATUS_PATH",
    "RebindResult",
    "SnapshotPatchError",
    "install",
    "rebind_gpu",
    "register_routes",
    "snapshot_state",
]

# ComfyUI only loads a custom node package that defines these.
NODE_CLASS_MAPPINGS: dict[str, Any] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}


def register_routes(routes: web.RouteTableDef) -> None:
    """Add the restore and status routes to ComfyUI's (or any aiohttp) route table."""
    from aiohttp import web

    async def restore(request: web.Request) -> web.Response:
        try:
            body: Any = await request.json() if request.can_read_body else {}
        except ValueError:
            return web.json_response({"error": "the body must be JSON"}, status=400)
        devices = body.get("cuda_visible_devices") if isinstance(body, dict) else None
        if devices is not None and not isinstance(devices, str):
            return web.json_response({"error": "cuda_visible_devices must be a string"}, status=400)
        try:
            result = rebind_gpu(cuda_visible_devices=devices)
        except SnapshotPatchError as exc:
            return web.json_response({"error": str(exc)}, status=500)
        return web.json_response(asdict(result))

    async def status(request: web.Request) -> web.Response:
        state = snapshot_state()
        return web.json_response({"patched": state is not None, **(state or {})})

    routes.post(RESTORE_PATH)(restore)
    routes.get(STATUS_PATH)(status)


def _register_with_comfyui() -> None:
    server = sys.modules.get("server")  # ComfyUI's server.py, present only inside ComfyUI
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if prompt_server is not None:
        register_routes(prompt_server.routes)


_register_with_comfyui()
