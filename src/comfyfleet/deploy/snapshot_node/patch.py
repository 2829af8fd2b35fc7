"""Let ComfyUI start without a GPU for a Modal memory snapshot, and bind the GPU after the restore.

Modal runs ``@modal.enter(snap=True)`` (which starts ComfyUI) with no GPU attached. ComfyUI's
``comfy/model_management.py`` asks ``get_torch_device()`` for the device while it is being imported
(``total_vram = get_total_memory(get_torch_device())``), and that ends in
``torch.cuda.current_device()``, which fails without a GPU. So, when ``COMFYFLEET_SNAPSHOT_MODE`` is
set, this module:

1. installs an import hook (from the node's ``prestartup_script.py``, which ComfyUI runs before it
   imports ``comfy.*``) for ``comfy.model_management``;
2. when ComfyUI imports that module, reads its source, checks that ``get_torch_device`` still has the
   shape this patch was written for (ComfyUI 0.8.0) and refuses loudly otherwise, then compiles the
   source with one extra statement right after the ``def``: the function is wrapped so that it returns
   the CPU device, without touching ``torch.cuda``, while the snapshot is being taken;
3. after the restore, ``rebind_gpu()`` (called through the node's HTTP route) checks that CUDA is
   there, switches the wrapper back to ComfyUI's own lookup and refreshes what ComfyUI measured on the
   CPU at import (``total_vram``).

Nothing is written to ComfyUI's files, and without the environment variable nothing changes at all.

This file is loaded by path inside ComfyUI's process, so it imports nothing but the standard library
and stays runnable on the Python ComfyUI runs on (3.9 and later).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any, TypedDict, cast

log = logging.getLogger("comfyfleet.snapshot")

ENV_VAR = "COMFYFLEET_SNAPSHOT_MODE"
TARGET_MODULE = "comfy.model_management"
TARGET_FUNCTION = "get_torch_device"
EXPECTED_COMFYUI_VERSION = "0.8.0"
RESTORE_PATH = "/comfyfleet/snapshot/restore"
STATUS_PATH = "/comfyfleet/snapshot/status"
# Names put into comfy.model_management's namespace. The state lives there, not in this module,
# because ComfyUI loads this file twice (once for the prestartup script, once through the node
# package) and the patched module is the one object both copies see.
STATE_ATTR = "__comfyfleet_snapshot__"
_WRAP_ATTR = "__comfyfleet_wrap_device_lookup__"
_TRUE = {"1", "true", "yes", "on"}


class SnapshotPatchError(RuntimeError):
    """The patch cannot be applied safely, or the GPU cannot be bound after the restore."""


class SnapshotState(TypedDict):
    cpu_only: bool
    comfyui_version: str | None
    fingerprint: str
    device: str | None


@dataclass(frozen=True)
class DeviceLookupShape:
    """What the patch relies on in ``get_torch_device``, read from the module's syntax tree."""

    parameters: tuple[str, ...]
    globals: frozenset[str]
    calls: frozenset[str]
    decorated: bool
    module_imports_torch: bool

    @property
    def fingerprint(self) -> str:
        canonical = repr(
            (
                self.parameters,
                sorted(self.globals),
                sorted(self.calls),
                self.decorated,
                self.module_imports_torch,
            )
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ComfyUI 0.8.0: no parameters; picks DirectML, MPS or CPU from module state, then asks the vendor
# runtime (XPU, NPU, MLU, else CUDA) for its current device. A change to any of this means the
# function was rewritten upstream and the wrapper's assumptions need a fresh look.
EXPECTED_SHAPE = DeviceLookupShape(
    parameters=(),
    globals=frozenset({"cpu_state", "directml_device", "directml_enabled"}),
    calls=frozenset(
        {
            "torch.device",
            "is_intel_xpu",
            "torch.xpu.current_device",
            "is_ascend_npu",
            "torch.npu.current_device",
            "is_mlu",
            "torch.mlu.current_device",
            "torch.cuda.current_device",
        }
    ),
    decorated=False,
    module_imports_torch=True,
)


@dataclass(frozen=True)
class RebindResult:
    patched: bool
    device: str | None = None
    comfyui_version: str | None = None


def snapshot_mode_requested(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(ENV_VAR, "").strip().lower() in _TRUE


# -------------------------------------------------------------------------------- shape checking


def comfyui_version(root: Path) -> str | None:
    """The version in ``<root>/comfyui_version.py``, read without importing it."""
    try:
        tree = ast.parse((root / "comfyui_version.py").read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            return node.value.value
    return None


def describe_device_lookup(tree: ast.Module) -> DeviceLookupShape | None:
    """The shape of the module-level ``get_torch_device``; None unless defined exactly once."""
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    matches = [n for n in defs if n.name == TARGET_FUNCTION]
    if len(matches) != 1 or not isinstance(matches[0], ast.FunctionDef):
        return None
    function = matches[0]
    args = function.args
    parameters = tuple(a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs))
    if args.vararg is not None:
        parameters += (f"*{args.vararg.arg}",)
    if args.kwarg is not None:
        parameters += (f"**{args.kwarg.arg}",)
    nodes = list(ast.walk(function))
    return DeviceLookupShape(
        parameters=parameters,
        globals=frozenset(name for n in nodes if isinstance(n, ast.Global) for name in n.names),
        calls=frozenset(
            name for n in nodes if isinstance(n, ast.Call) and (name := _dotted(n.func)) is not None
        ),
        decorated=bool(function.decorator_list),
        module_imports_torch=any(
            isinstance(n, ast.Import) and any(a.name == "torch" and a.asname is None for a in n.names)
            for n in tree.body
        ),
    )


def check_device_lookup(
    tree: ast.Module,
    *,
    version: str | None,
    filename: str,
    expected: DeviceLookupShape = EXPECTED_SHAPE,
) -> DeviceLookupShape:
    """The shape when it is the expected one; otherwise ``SnapshotPatchError`` saying what differs."""
    shape = describe_device_lookup(tree)
    if shape is not None and shape == expected:
        if version != EXPECTED_COMFYUI_VERSION:
            log.warning(
                "comfyfleet snapshot patch: ComfyUI %s (written for %s), but %s() has the expected shape",
                version or "of unknown version",
                EXPECTED_COMFYUI_VERSION,
                TARGET_FUNCTION,
            )
        return shape
    if shape is None:
        differences = [f"no single module-level `def {TARGET_FUNCTION}()`"]
    else:
        differences = _differences(shape, expected)
    raise SnapshotPatchError(
        f"comfyfleet snapshot patch refused: {filename} of ComfyUI {version or '(unknown version)'} "
        f"does not have the {TARGET_FUNCTION}() this patch was written for (ComfyUI "
        f"{EXPECTED_COMFYUI_VERSION}, shape {expected.fingerprint}"
        + (f", found {shape.fingerprint}" if shape else "")
        + "): "
        + "; ".join(differences)
        + f". Starting ComfyUI on the CPU for a memory snapshot is not safe with a device lookup we have "
        f"not reviewed. Review comfyfleet/deploy/snapshot_node/patch.py against this ComfyUI version and "
        f"update EXPECTED_SHAPE, or unset {ENV_VAR} to start without the snapshot patch."
    )


def _differences(found: DeviceLookupShape, expected: DeviceLookupShape) -> list[str]:
    out: list[str] = []
    if found.parameters != expected.parameters:
        out.append(
            f"parameters ({', '.join(found.parameters)}) instead of ({', '.join(expected.parameters)})"
        )
    for label, have, want in (
        ("globals", found.globals, expected.globals),
        ("calls", found.calls, expected.calls),
    ):
        if missing := sorted(want - have):
            out.append(f"{label} missing: {', '.join(missing)}")
        if unexpected := sorted(have - want):
            out.append(f"unexpected {label}: {', '.join(unexpected)}")
    if found.decorated != expected.decorated:
        out.append("it is decorated" if found.decorated else "it lost its decorator")
    if found.module_imports_torch != expected.module_imports_torch:
        out.append("the module does not `import torch` at top level")
    return out


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base is not None else None
    return None


def build_patched_code(source: str, filename: str, version: str | None) -> tuple[CodeType, DeviceLookupShape]:
    """Check the source, then compile it with ``get_torch_device`` wrapped right after its ``def``."""
    tree = ast.parse(source, filename)
    shape = check_device_lookup(tree, version=version, filename=filename)
    index, function = next(
        (i, n)
        for i, n in enumerate(tree.body)
        if isinstance(n, ast.FunctionDef) and n.name == TARGET_FUNCTION
    )
    # Right after the def, so even the call ComfyUI makes while the module is still being imported
    # goes through the wrapper.
    wrap = ast.parse(f"{TARGET_FUNCTION} = {_WRAP_ATTR}({TARGET_FUNCTION}, globals())").body[0]
    line = function.end_lineno or function.lineno
    for node in ast.walk(wrap):
        if isinstance(node, (ast.stmt, ast.expr)):
            node.lineno, node.end_lineno, node.col_offset, node.end_col_offset = line, line, 0, 0
    tree.body.insert(index + 1, wrap)
    return compile(tree, filename, "exec"), shape


# ----------------------------------------------------------------------------------- the wrapper


def wrap_device_lookup(original: Callable[[], Any], namespace: dict[str, Any]) -> Callable[[], Any]:
    """ComfyUI's ``get_torch_device``, answering "cpu" while the module's state says cpu_only."""
    state: SnapshotState = namespace[STATE_ATTR]

    @functools.wraps(original)
    def get_torch_device() -> Any:
        if state["cpu_only"]:
            # Not even torch.cuda.is_available(): no CUDA call while the snapshot is taken, so that
            # nothing in the CUDA runtime is initialised, or remembers "no device", in the snapshot.
            return namespace["torch"].device("cpu")
        return original()

    return get_torch_device


# ----------------------------------------------------------------------------- the import hook


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, path: Path) -> None:
        self._path = path

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        source = importlib.util.decode_source(self._path.read_bytes())
        # <ComfyUI>/comfy/model_management.py -> <ComfyUI>/comfyui_version.py
        version = comfyui_version(self._path.parent.parent)
        code, shape = build_patched_code(source, str(self._path), version)
        namespace = module.__dict__
        namespace[STATE_ATTR] = SnapshotState(
            cpu_only=True, comfyui_version=version, fingerprint=shape.fingerprint, device=None
        )
        namespace[_WRAP_ATTR] = wrap_device_lookup
        log.info("comfyfleet snapshot patch: ComfyUI %s starts on the CPU until rebind_gpu()", version)
        # ComfyUI's own module source, checked above; only recompiled with the lookup wrapped.
        exec(code, namespace)  # noqa: S102


class _DeviceLookupFinder(importlib.abc.MetaPathFinder):
    comfyfleet_snapshot_finder = True  # recognised across the two copies of this file

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None:
            return None  # the normal ModuleNotFoundError follows
        if spec.origin is None or not spec.origin.endswith(".py"):
            raise SnapshotPatchError(
                f"comfyfleet snapshot patch refused: {TARGET_MODULE} is not a source file ({spec.origin}), "
                f"so its {TARGET_FUNCTION}() cannot be checked; unset {ENV_VAR} to start without the patch."
            )
        spec.loader = _PatchingLoader(Path(spec.origin))
        return spec


def install(environ: Mapping[str, str] | None = None) -> bool:
    """Install the import hook when snapshot mode is asked for; returns whether it did."""
    if not snapshot_mode_requested(environ):
        return False
    if TARGET_MODULE in sys.modules:
        raise SnapshotPatchError(
            f"comfyfleet snapshot patch: {TARGET_MODULE} was imported before the patch could be installed "
            "(did another prestartup script import it?); ComfyUI would probe CUDA without a GPU."
        )
    if not any(getattr(finder, "comfyfleet_snapshot_finder", False) for finder in sys.meta_path):
        sys.meta_path.insert(0, _DeviceLookupFinder())
        log.info("comfyfleet snapshot patch: %s will be checked and patched when imported", TARGET_MODULE)
    return True


# --------------------------------------------------------------------------------- after restore


def snapshot_state() -> SnapshotState | None:
    module = sys.modules.get(TARGET_MODULE)
    state = getattr(module, STATE_ATTR, None) if module is not None else None
    return cast(SnapshotState, state) if isinstance(state, dict) else None


def rebind_gpu(*, cuda_visible_devices: str | None = None) -> RebindResult:
    """After the restore: use ComfyUI's own device lookup again, on the GPU that is now attached.

    A no-op (``patched=False``) when the patch is not active. Raises ``SnapshotPatchError`` when CUDA
    is still unavailable: silently running jobs on the CPU of a GPU container is the failure to avoid.
    """
    module = sys.modules.get(TARGET_MODULE)
    state = snapshot_state()
    if module is None or state is None:
        return RebindResult(patched=False)
    if cuda_visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    torch = module.__dict__["torch"]
    if not torch.cuda.is_available():
        raise SnapshotPatchError(
            "comfyfleet snapshot patch: CUDA is not available after the snapshot restore, so ComfyUI "
            f"{state['comfyui_version']} would run on the CPU; refusing to rebind"
        )
    state["cpu_only"] = False
    device = module.get_torch_device()
    # ComfyUI measured the memory of the CPU "device" at import; its memory heuristics read this.
    get_total_memory = getattr(module, "get_total_memory", None)
    if callable(get_total_memory):
        module.__dict__["total_vram"] = get_total_memory(device) / (1024 * 1024)
    state["device"] = str(device)
    log.info("comfyfleet snapshot patch: ComfyUI now runs on %s", device)
    return RebindResult(patched=True, device=str(device), comfyui_version=state["comfyui_version"])
