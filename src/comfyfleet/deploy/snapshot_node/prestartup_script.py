"""Run by ComfyUI before it imports ``comfy.*``: installs the snapshot patch's import hook.

ComfyUI executes every custom node's ``prestartup_script.py`` by path (no package, so no relative
imports) early in ``main.py``; that is the only moment before ``comfy.model_management`` is imported.
Without ``COMFYFLEET_SNAPSHOT_MODE`` this does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_PATCH_MODULE = "comfyfleet_snapshot_patch"


def _load_patch() -> ModuleType:
    loaded = sys.modules.get(_PATCH_MODULE)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(_PATCH_MODULE, Path(__file__).with_name("patch.py"))
    if spec is None or spec.loader is None:
        raise ImportError("patch.py is missing next to prestartup_script.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_PATCH_MODULE] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


try:
    _load_patch().install()
except Exception as exc:
    # ComfyUI logs and ignores an Exception from a prestartup script, and would then crash later on a
    # misleading CUDA error (or, worse, run without the patch). SystemExit is not an Exception: it
    # stops ComfyUI here with our message.
    raise SystemExit(f"comfyfleet snapshot patch could not be installed: {exc}") from exc
