"""Which node classes a tenant's graph may run, and which inputs name files (``NodePolicy``).

``DEFAULT_DENIED`` lists the classes no graph may use (they read or write files the job does not own,
or write model weights); ``KNOWN_FILE_INPUTS`` and ``KNOWN_PREFIX_CLASSES`` fill in what ComfyUI's
``/object_info`` does not say. ``check_policy`` applies a policy at submit time: a file input must hold
a ``core/ASSET`` reference (or, at run time, one of the job's staged names). Pure functions, no I/O;
errors carry the details shape described in ``graph.py``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from comfyfleet.worker.comfy.graph import (
    NO_NODE_LIMIT,
    NodeErrors,
    is_asset_ref,
    is_link,
    short_repr,
    validate_api_format,
)

DEFAULT_DENIED: frozenset[str] = frozenset(
    {
        # Read files the job does not own: the shared output folder (other tenants' results), or
        # whole input sub-folders, which is where every job's staged inputs live.
        "LoadImageOutput",
        "LoadImageDataSetFromFolder",
        "LoadImageTextDataSetFromFolder",
        "LoadImageSetFromFolderNode",
        "LoadImageTextSetFromFolderNode",
        "LoadTrainingDataset",
        # Write under a caller-chosen folder or prefix that is not a ComfyUI filename_prefix, so the
        # worker cannot force it into the job's folder ("../" reaches outside the output folder).
        "SaveImageDataSetToFolder",
        "SaveImageTextDataSetToFolder",
        "SaveTrainingDataset",
        "SaveLoRANode",
        # Write model weights: gigabytes per run that the worker would then upload as job outputs.
        "CheckpointSave",
        "ImageOnlyCheckpointSave",
        "CLIPSave",
        "VAESave",
        "ModelSave",
        "LoraSave",
        # Popular custom nodes that take a server path, directory or URL as a plain string.
        "VHS_LoadVideoPath",
        "VHS_LoadVideoFFmpegPath",
        "VHS_LoadImagePath",
        "VHS_LoadImagesPath",
        "VHS_LoadImages",
        "VHS_LoadAudio",
        "Image Load",
        "Image Save",
        "Load Text File",
        "Save Text File",
    }
)

# Inputs that name a file in ComfyUI's input folder. The catalog adds every input flagged for upload
# (image_upload, video_upload, ...); these are the ones object_info does not flag, or flags in a way
# older versions did not. LoadLatent stays allowed: it reads safetensors, and only staged files.
KNOWN_FILE_INPUTS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "LoadImage": frozenset({"image"}),
        "LoadImageMask": frozenset({"image"}),
        "LoadImageOutput": frozenset({"image"}),
        "WebcamCapture": frozenset({"image"}),
        "LoadLatent": frozenset({"latent"}),
        "LoadAudio": frozenset({"audio"}),
        "RecordAudio": frozenset({"audio"}),
        "LoadVideo": frozenset({"file"}),
        "Load3D": frozenset({"model_file"}),
        "Load3DAnimation": frozenset({"model_file"}),
        "VHS_LoadVideo": frozenset({"video"}),
        "VHS_LoadVideoFFmpeg": frozenset({"video"}),
        "VHS_LoadAudioUpload": frozenset({"audio"}),
    }
)

# Output nodes whose filename_prefix is optional or defaulted: the worker sets it even when the graph
# leaves it out, so no file lands outside the job's folder.
KNOWN_PREFIX_CLASSES: frozenset[str] = frozenset(
    {
        "SaveImage",
        "SaveAnimatedWEBP",
        "SaveAnimatedPNG",
        "SaveVideo",
        "SaveWEBM",
        "SaveAudio",
        "SaveAudioMP3",
        "SaveAudioOpus",
        "SaveLatent",
        "SaveGLB",
    }
)


def _known_file_inputs() -> Mapping[str, frozenset[str]]:
    return KNOWN_FILE_INPUTS


@dataclass(frozen=True, slots=True)
class NodePolicy:
    """Which node classes a tenant's graph may use, and which inputs name files.

    ``allowed=None`` admits whatever the catalog reports (or anything, without a catalog);
    ``denied`` always wins. ``NodeCatalog.policy()`` fills ``catalog_classes``, ``file_inputs`` and
    ``prefix_classes`` from the worker's ``/object_info``.
    """

    allowed: frozenset[str] | None = None
    denied: frozenset[str] = DEFAULT_DENIED
    catalog_classes: frozenset[str] | None = None
    file_inputs: Mapping[str, frozenset[str]] = field(default_factory=_known_file_inputs)
    prefix_classes: frozenset[str] = KNOWN_PREFIX_CLASSES

    def class_problem(self, class_type: str) -> tuple[str, str] | None:
        """``(error type, message)`` when ``class_type`` may not run, else None."""
        if class_type in self.denied:
            return "node_class_denied", f"node class '{class_type}' is not permitted on this service"
        if self.allowed is not None and class_type not in self.allowed:
            return "node_class_not_allowed", f"node class '{class_type}' is not in the allowed set"
        if self.catalog_classes is not None and class_type not in self.catalog_classes:
            return "unknown_node_class", f"node class '{class_type}' does not exist on this worker"
        return None

    def is_file_input(self, class_type: str, input_name: str) -> bool:
        return input_name in self.file_inputs.get(class_type, frozenset())


def check_policy(workflow: object, policy: NodePolicy, *, staged_names: Collection[str] = ()) -> None:
    """Reject node classes the policy refuses and file inputs that name anything but the job's own
    staged files. At submit time no file is staged yet, so only ``core/ASSET`` values pass."""
    graph = validate_api_format(workflow, max_nodes=NO_NODE_LIMIT)
    policy_errors(graph, policy, frozenset(staged_names)).raise_if_any()


def policy_errors(
    graph: Mapping[str, dict[str, Any]], policy: NodePolicy, staged: frozenset[str]
) -> NodeErrors:
    """The policy's complaints about a graph ``validate_api_format`` already accepted; ``staged`` holds
    the names a file input may take besides a ``core/ASSET`` reference."""
    errors = NodeErrors(graph)
    for node_id, node in graph.items():
        class_type: str = node["class_type"]
        if (problem := policy.class_problem(class_type)) is not None:
            errors.add(node_id, *problem)
        for name, value in node["inputs"].items():
            if policy.is_file_input(class_type, name) and (reason := _file_reference_problem(value, staged)):
                errors.add(
                    node_id, "file_reference_not_allowed", f"input '{name}': {reason}", input_name=name
                )
    return errors


def _file_reference_problem(value: object, staged: frozenset[str]) -> str | None:
    if is_asset_ref(value):
        return None
    if isinstance(value, str):
        if value in staged:
            return None
        return (
            f"{short_repr(value)} is not one of this job's inputs; "
            "upload the file as an asset and pass its core/ASSET reference"
        )
    if is_link(value):
        # The name would be computed at run time and could point anywhere.
        return "a file input cannot be linked; pass a core/ASSET reference"
    return "a file input takes a core/ASSET reference"
