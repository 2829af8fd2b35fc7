"""The Modal memory-snapshot helper node, against small fixtures shaped like ComfyUI's
``comfy/model_management.py`` (tests/fixtures/fake_comfy*, with a fake ``torch``).

The end-to-end cases run in a fresh interpreter, the way ComfyUI uses the node: execute the node's
``prestartup_script.py`` by path, then ``import comfy.model_management``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from comfyfleet.deploy import snapshot_node
from comfyfleet.deploy.snapshot_node import patch

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
FAKE_COMFY = FIXTURES / "fake_comfy"
CHANGED_COMFY = FIXTURES / "fake_comfy_changed"
NODE_DIR = Path(snapshot_node.__file__).parent
PRESTARTUP = NODE_DIR / "prestartup_script.py"

# What ComfyUI's main.py does with the node, then what the worker does after a restore.
COMFY_LIKE_RUN = textwrap.dedent(
    """
    import importlib.util, json, os, sys

    def run_prestartup_script(path):
        spec = importlib.util.spec_from_file_location(os.path.splitext(path)[0], path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)

    prestartup, step = sys.argv[1], sys.argv[2]
    run_prestartup_script(prestartup)
    import comfy.model_management as mm

    out = {
        "import_device": str(mm.get_torch_device()),
        "import_total_vram": mm.total_vram,
        "patched": "__comfyfleet_snapshot__" in vars(mm),
    }
    if step in ("restore", "restore-without-gpu"):
        if step == "restore":
            os.environ["FAKE_TORCH_GPU"] = "1"  # Modal attaches the GPU when it restores
        patch = sys.modules["comfyfleet_snapshot_patch"]
        try:
            result = patch.rebind_gpu()
            out["rebind"] = [result.patched, result.device, result.comfyui_version]
        except patch.SnapshotPatchError as exc:
            out["error"] = str(exc)
        out["device"] = str(mm.get_torch_device())
        out["total_vram"] = mm.total_vram
    if step == "restore-through-the-node-route":
        # ComfyUI loads the node package after its server exists; a stand-in server module here.
        import asyncio, types
        from aiohttp import web
        from aiohttp.test_utils import make_mocked_request

        prompt_server = types.SimpleNamespace(routes=web.RouteTableDef())
        server_class = types.SimpleNamespace(instance=prompt_server)
        sys.modules["server"] = types.SimpleNamespace(PromptServer=server_class)
        init = os.path.join(os.path.dirname(prestartup), "__init__.py")
        spec = importlib.util.spec_from_file_location("comfyfleet_snapshot", init)
        node = importlib.util.module_from_spec(spec)
        sys.modules["comfyfleet_snapshot"] = node
        spec.loader.exec_module(node)
        handlers = {(r.method, r.path): r.handler for r in prompt_server.routes}
        os.environ["FAKE_TORCH_GPU"] = "1"
        path = "/comfyfleet/snapshot/restore"
        response = asyncio.run(handlers[("POST", path)](make_mocked_request("POST", path)))
        out["response"] = [response.status, json.loads(response.body)]
        out["device"] = str(mm.get_torch_device())
    print(json.dumps(out))
    """
)


def run_like_comfyui(
    comfy_root: Path, step: str, *, snapshot_mode: bool, gpu: bool
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (patch.ENV_VAR, "FAKE_TORCH_GPU", "PYTHONPATH")}
    env["PYTHONPATH"] = str(comfy_root)
    if snapshot_mode:
        env[patch.ENV_VAR] = "1"
    if gpu:
        env["FAKE_TORCH_GPU"] = "1"
    return subprocess.run(
        [sys.executable, "-c", COMFY_LIKE_RUN, str(PRESTARTUP), step],
        env=env,
        cwd=comfy_root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def output(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


# ----------------------------------------------------------------------------------- end to end


def test_snapshot_mode_starts_on_the_cpu_and_rebinds_the_gpu_after_restore() -> None:
    data = output(run_like_comfyui(FAKE_COMFY, "restore", snapshot_mode=True, gpu=False))

    # While the snapshot is taken: no GPU, yet the import went through, on the CPU.
    assert data["patched"] is True
    assert data["import_device"] == "cpu"
    assert data["import_total_vram"] == 64 * 1024  # MiB of "RAM", measured on the CPU device
    # After the restore: ComfyUI's own lookup again, and its memory figure is the GPU's.
    assert data["rebind"] == [True, "cuda:0", "0.8.0"]
    assert data["device"] == "cuda:0"
    assert data["total_vram"] == 24 * 1024


def test_rebind_refuses_to_leave_comfyui_on_the_cpu_when_no_gpu_came_back() -> None:
    data = output(run_like_comfyui(FAKE_COMFY, "restore-without-gpu", snapshot_mode=True, gpu=False))

    assert "CUDA is not available after the snapshot restore" in data["error"]
    assert data["device"] == "cpu"


def test_the_node_route_rebinds_the_gpu_of_the_patched_comfyui() -> None:
    # The route's copy of patch.py is not the prestartup script's copy; the state they share lives in
    # the patched module.
    data = output(
        run_like_comfyui(FAKE_COMFY, "restore-through-the-node-route", snapshot_mode=True, gpu=False)
    )

    assert data["response"] == [200, {"patched": True, "device": "cuda:0", "comfyui_version": "0.8.0"}]
    assert data["device"] == "cuda:0"


def test_without_the_env_var_comfyui_is_left_alone() -> None:
    with_gpu = output(run_like_comfyui(FAKE_COMFY, "import", snapshot_mode=False, gpu=True))
    assert with_gpu == {"import_device": "cuda:0", "import_total_vram": 24 * 1024, "patched": False}

    # ... which, without a GPU, means the import-time probe fails: the problem the patch solves.
    without_gpu = run_like_comfyui(FAKE_COMFY, "import", snapshot_mode=False, gpu=False)
    assert without_gpu.returncode != 0
    assert "fake torch: no cuda device is available" in without_gpu.stderr


def test_a_comfyui_with_a_different_device_lookup_fails_loudly_at_start() -> None:
    result = run_like_comfyui(CHANGED_COMFY, "import", snapshot_mode=True, gpu=False)

    assert result.returncode != 0
    assert "SnapshotPatchError: comfyfleet snapshot patch refused" in result.stderr
    assert "ComfyUI 0.9.0" in result.stderr
    assert "written for (ComfyUI 0.8.0" in result.stderr


# ------------------------------------------------------------------------------------ the check


def test_the_fixture_has_the_shape_of_comfyui_0_8_0() -> None:
    tree = ast.parse((FAKE_COMFY / "comfy" / "model_management.py").read_text())

    shape = patch.check_device_lookup(tree, version="0.8.0", filename="model_management.py")

    assert shape == patch.EXPECTED_SHAPE
    assert shape.fingerprint == patch.EXPECTED_SHAPE.fingerprint


def test_a_different_shape_is_refused_with_what_differs_and_the_version() -> None:
    tree = ast.parse((CHANGED_COMFY / "comfy" / "model_management.py").read_text())

    with pytest.raises(patch.SnapshotPatchError) as raised:
        patch.check_device_lookup(tree, version="0.9.0", filename="comfy/model_management.py")

    message = str(raised.value)
    assert "comfy/model_management.py of ComfyUI 0.9.0" in message
    assert f"written for (ComfyUI 0.8.0, shape {patch.EXPECTED_SHAPE.fingerprint}" in message
    assert "parameters (index) instead of ()" in message
    assert "calls missing: " in message and "torch.cuda.current_device" in message
    assert "unexpected calls: torch.accelerator.current_accelerator" in message
    assert patch.ENV_VAR in message


@pytest.mark.parametrize(
    "source",
    [
        "import torch\n",
        "import torch\ndef get_torch_device():\n    pass\ndef get_torch_device():\n    pass\n",
        "import torch\nif True:\n    def get_torch_device():\n        pass\n",
    ],
    ids=["missing", "defined-twice", "not-at-module-level"],
)
def test_a_missing_or_ambiguous_device_lookup_is_refused(source: str) -> None:
    with pytest.raises(patch.SnapshotPatchError, match="no single module-level `def get_torch_device"):
        patch.check_device_lookup(ast.parse(source), version=None, filename="m.py")


def test_the_version_is_read_without_importing_it(tmp_path: Path) -> None:
    assert patch.comfyui_version(FAKE_COMFY) == "0.8.0"
    assert patch.comfyui_version(tmp_path) is None


# -------------------------------------------------------------------------------------- install


def test_install_does_nothing_without_the_env_var() -> None:
    hooks = list(sys.meta_path)

    assert patch.install(environ={}) is False
    assert patch.install(environ={patch.ENV_VAR: "0"}) is False
    assert sys.meta_path == hooks


def test_install_refuses_when_comfyui_already_imported_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, patch.TARGET_MODULE, ModuleType(patch.TARGET_MODULE))
    hooks = list(sys.meta_path)

    with pytest.raises(patch.SnapshotPatchError, match="imported before the patch"):
        patch.install(environ={patch.ENV_VAR: "1"})
    assert sys.meta_path == hooks


# --------------------------------------------------------------------------------------- routes


async def test_the_restore_route_is_a_no_op_when_the_patch_is_not_active() -> None:
    assert patch.TARGET_MODULE not in sys.modules
    routes = web.RouteTableDef()
    snapshot_node.register_routes(routes)
    app = web.Application()
    app.add_routes(routes)

    async with TestClient(TestServer(app)) as client:
        restored = await client.post(patch.RESTORE_PATH)
        assert restored.status == 200
        assert await restored.json() == {"patched": False, "device": None, "comfyui_version": None}

        status = await client.get(patch.STATUS_PATH)
        assert await status.json() == {"patched": False}

        bad = await client.post(
            patch.RESTORE_PATH, data=b"not json", headers={"Content-Type": "application/json"}
        )
        assert bad.status == 400
