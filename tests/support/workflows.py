"""API-format workflows used across tests (node classes the ComfyUI stand-in implements)."""

from __future__ import annotations

from typing import Any


def empty_image_save(
    width: int = 64, height: int = 64, color: int = 0, prefix: str = "out"
) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def load_invert_save(asset: dict[str, Any]) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": {"__type": "core/ASSET", "info": asset}}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inverted"}},
    }
