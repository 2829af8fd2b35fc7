"""The node classes the stand-in knows: schemas shaped like ComfyUI 0.8.0's object_info, real Pillow work.

Images travel between nodes as a batch (a list of RGB ``PIL.Image``), masks as a list of ``L`` images.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image, ImageFilter, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from .config import Dirs, StandinConfig
from .files import annotated_path, input_files, save_target

Images = list[Image.Image]
InputSpec = list[Any]  # ["INT", {...}] or [["a", "b"], {...}] or ["IMAGE"]


@dataclass(frozen=True)
class PreviewFrame:
    """An image the node wants shown while it runs (sent as a binary WebSocket frame)."""

    image: Image.Image
    format: str  # "JPEG" or "PNG"


class NodeContext(Protocol):
    """What the executor gives a running node."""

    prompt_id: str
    node_id: str
    dirs: Dirs
    config: StandinConfig
    extra_data: dict[str, Any]

    @property
    def previews_enabled(self) -> bool: ...

    async def progress(self, value: int, total: int, preview: PreviewFrame | None = None) -> None:
        """ComfyUI's ProgressBar hook: raises if interrupted, else sends progress_state, progress, preview."""

    async def sleep(self, seconds: float) -> None:
        """Sleep that polls the interrupt flag, as a sampler step does."""


@dataclass(frozen=True)
class NodeResult:
    outputs: tuple[Any, ...] = ()
    ui: dict[str, Any] | None = None


RunFn = Callable[..., Awaitable[NodeResult]]
ValidateFn = Callable[..., "bool | str"]


@dataclass(frozen=True)
class NodeDef:
    name: str
    display_name: str
    category: str
    python_module: str
    inputs: Callable[[Dirs], dict[str, dict[str, Any]]]
    run: RunFn
    return_types: tuple[str, ...] = ()
    output_node: bool = False
    description: str = ""
    # A custom VALIDATE_INPUTS: the inputs it names skip the generic min/max/list checks.
    validate: ValidateFn | None = None
    validate_names: tuple[str, ...] = ()
    # IS_CHANGED: folded into the cache key (LoadImage hashes the file, so a new upload re-runs).
    is_changed: Callable[[Dirs, dict[str, Any]], str] | None = None
    hidden_values: tuple[str, ...] = field(default_factory=tuple)

    def input_info(self, dirs: Dirs, name: str) -> tuple[Any, str, dict[str, Any]] | None:
        """(input_type, category, extra_info) the way ComfyUI's validator looks an input up."""
        for category, specs in self.inputs(dirs).items():
            if name in specs:
                spec = specs[name]
                if category == "hidden":
                    return spec, category, {}
                extra = spec[1] if len(spec) > 1 else {}
                return spec[0], category, extra
        return None

    def object_info(self, dirs: Dirs) -> dict[str, Any]:
        schema = self.inputs(dirs)
        return {
            "input": schema,
            "input_order": {category: list(specs) for category, specs in schema.items()},
            "output": list(self.return_types),
            "output_is_list": [False] * len(self.return_types),
            "output_name": list(self.return_types),
            "name": self.name,
            "display_name": self.display_name,
            "description": self.description,
            "python_module": self.python_module,
            "category": self.category,
            "output_node": self.output_node,
        }


def _const(schema: dict[str, dict[str, Any]]) -> Callable[[Dirs], dict[str, dict[str, Any]]]:
    return lambda _dirs: schema


_SIZE = {"default": 512, "min": 1, "max": 16384, "step": 1}
_SCALE_SIZE = {"default": 512, "min": 0, "max": 16384, "step": 1}
_SAVE_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
_RESAMPLE = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


# --- image sources -------------------------------------------------------------------------------


async def _empty_image(ctx: NodeContext, width: int, height: int, batch_size: int, color: int) -> NodeResult:
    rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
    return NodeResult(([Image.new("RGB", (width, height), rgb) for _ in range(batch_size)],))


async def _empty_latent(ctx: NodeContext, width: int, height: int, batch_size: int) -> NodeResult:
    # Only its type matters here (a LATENT linked into an IMAGE input must fail validation).
    return NodeResult(({"samples_shape": [batch_size, 4, height // 8, width // 8]},))


def _load_image_file(path: str) -> tuple[Images, list[Image.Image]]:
    # Image.open raises PIL.UnidentifiedImageError for non-images: the runtime error of transcript 04.
    opened = Image.open(path)
    images: Images = []
    masks: list[Image.Image] = []
    for frame in ImageSequence.Iterator(opened):
        frame = ImageOps.exif_transpose(frame) or frame
        if images and frame.size != images[0].size:
            continue  # ComfyUI drops frames whose size differs from the first
        images.append(frame.convert("RGB"))
        if "A" in frame.getbands():
            masks.append(ImageOps.invert(frame.getchannel("A")))
        else:
            masks.append(Image.new("L", (64, 64), 0))
    return images, masks


async def _load_image(ctx: NodeContext, image: str) -> NodeResult:
    images, masks = _load_image_file(str(annotated_path(ctx.dirs, image)))
    return NodeResult((images, masks))


def _validate_load_image(dirs: Dirs, image: str) -> bool | str:
    return True if annotated_path(dirs, image).is_file() else f"Invalid image file: {image}"


def _load_image_changed(dirs: Dirs, inputs: dict[str, Any]) -> str:
    path = annotated_path(dirs, str(inputs.get("image", "")))
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "missing"


def _load_image_inputs(dirs: Dirs) -> dict[str, dict[str, Any]]:
    return {"required": {"image": [input_files(dirs), {"image_upload": True}]}}


# --- image operations ----------------------------------------------------------------------------


async def _invert(ctx: NodeContext, image: Images) -> NodeResult:
    return NodeResult(([ImageOps.invert(img.convert("RGB")) for img in image],))


def _center_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    old_w, old_h = img.size
    old_aspect, new_aspect = old_w / old_h, width / height
    if old_aspect > new_aspect:
        keep = round(old_h * new_aspect)
        left = (old_w - keep) // 2
        return img.crop((left, 0, left + keep, old_h))
    keep = round(old_w / new_aspect)
    top = (old_h - keep) // 2
    return img.crop((0, top, old_w, top + keep))


async def _scale(
    ctx: NodeContext, image: Images, upscale_method: str, width: int, height: int, crop: str
) -> NodeResult:
    if width == 0 and height == 0:
        return NodeResult((image,))
    out: Images = []
    for img in image:
        w, h = width, height
        if w == 0:  # keep the aspect ratio when one side is 0, as ComfyUI does
            w = max(1, round(img.width * h / img.height))
        if h == 0:
            h = max(1, round(img.height * w / img.width))
        src = _center_crop(img, w, h) if crop == "center" else img
        out.append(src.resize((w, h), _RESAMPLE[upscale_method]))
    return NodeResult((out,))


async def _blur(ctx: NodeContext, image: Images, blur_radius: int, sigma: float) -> NodeResult:
    if blur_radius == 0:
        return NodeResult((image,))
    return NodeResult(([img.filter(ImageFilter.GaussianBlur(radius=sigma)) for img in image],))


async def _slow_sampler(ctx: NodeContext, image: Images, steps: int, seconds_per_step: float) -> NodeResult:
    """A sampler-like node: one progress message per step (values 1..steps, like KSampler), an optional
    JPEG preview per step, and an interrupt honoured within a step."""
    target = [ImageOps.invert(img.convert("RGB")) for img in image]
    current = image
    for step in range(1, steps + 1):
        await ctx.sleep(seconds_per_step)
        current = [Image.blend(a, b, step / steps) for a, b in zip(image, target, strict=True)]
        preview = None
        if ctx.previews_enabled and current:
            thumb = current[0].copy()
            thumb.thumbnail((512, 512))
            preview = PreviewFrame(thumb, "JPEG")
        await ctx.progress(step, steps, preview)
    return NodeResult((current,))


# --- outputs -------------------------------------------------------------------------------------


def _png_info(ctx: NodeContext, prompt: Any, extra_pnginfo: Any) -> PngInfo | None:
    if ctx.config.disable_metadata:
        return None
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    if isinstance(extra_pnginfo, dict):
        for key, value in extra_pnginfo.items():
            info.add_text(key, json.dumps(value))
    return info


def _write_images(
    ctx: NodeContext, images: Images, prefix: str, kind: str, prompt: Any, extra_pnginfo: Any, level: int
) -> NodeResult:
    base = ctx.dirs.output if kind == "output" else ctx.dirs.temp
    first = images[0] if images else Image.new("RGB", (0, 0))
    target = save_target(prefix, base, first.width, first.height)
    info = _png_info(ctx, prompt, extra_pnginfo)
    counter = target.counter
    results: list[dict[str, str]] = []
    for batch_number, img in enumerate(images):
        name = target.basename.replace("%batch_num%", str(batch_number))
        filename = f"{name}_{counter:05}_.png"
        img.save(target.folder / filename, pnginfo=info, compress_level=level)
        results.append({"filename": filename, "subfolder": target.subfolder, "type": kind})
        counter += 1
    return NodeResult((), {"images": results})


async def _save_image(
    ctx: NodeContext,
    images: Images,
    filename_prefix: str = "ComfyUI",
    prompt: Any = None,
    extra_pnginfo: Any = None,
) -> NodeResult:
    return _write_images(ctx, images, filename_prefix, "output", prompt, extra_pnginfo, level=4)


async def _preview_image(
    ctx: NodeContext, images: Images, prompt: Any = None, extra_pnginfo: Any = None
) -> NodeResult:
    suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    return _write_images(ctx, images, f"ComfyUI_temp_{suffix}", "temp", prompt, extra_pnginfo, level=1)


async def _save_image_websocket(ctx: NodeContext, images: Images) -> NodeResult:
    # Like custom_nodes/websocket_image_save.py: progress 0..n-1 of n, one PNG frame each, no file.
    for step, img in enumerate(images):
        await ctx.progress(step, len(images), PreviewFrame(img, "PNG"))
    return NodeResult((), None)


# --- registry ------------------------------------------------------------------------------------

_SAVE_DESCRIPTION = "Saves the input images to your ComfyUI output directory."
_PREFIX_TOOLTIP = (
    "The prefix for the file to save. This may include formatting information such as "
    "%date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."
)

NODES: dict[str, NodeDef] = {
    node.name: node
    for node in (
        NodeDef(
            name="EmptyImage",
            display_name="EmptyImage",
            category="image",
            python_module="nodes",
            inputs=_const(
                {
                    "required": {
                        "width": ["INT", dict(_SIZE)],
                        "height": ["INT", dict(_SIZE)],
                        "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
                        "color": [
                            "INT",
                            {"default": 0, "min": 0, "max": 16777215, "step": 1, "display": "color"},
                        ],
                    }
                }
            ),
            run=_empty_image,
            return_types=("IMAGE",),
        ),
        NodeDef(
            name="EmptyLatentImage",
            display_name="Empty Latent Image",
            category="latent",
            python_module="nodes",
            inputs=_const(
                {
                    "required": {
                        "width": ["INT", {"default": 512, "min": 16, "max": 16384, "step": 8}],
                        "height": ["INT", {"default": 512, "min": 16, "max": 16384, "step": 8}],
                        "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
                    }
                }
            ),
            run=_empty_latent,
            return_types=("LATENT",),
        ),
        NodeDef(
            name="LoadImage",
            display_name="Load Image",
            category="image",
            python_module="nodes",
            inputs=_load_image_inputs,
            run=_load_image,
            return_types=("IMAGE", "MASK"),
            validate=_validate_load_image,
            validate_names=("image",),
            is_changed=_load_image_changed,
        ),
        NodeDef(
            name="ImageInvert",
            display_name="Invert Image",
            category="image",
            python_module="nodes",
            inputs=_const({"required": {"image": ["IMAGE"]}}),
            run=_invert,
            return_types=("IMAGE",),
        ),
        NodeDef(
            name="ImageScale",
            display_name="Upscale Image",
            category="image/upscaling",
            python_module="nodes",
            inputs=_const(
                {
                    "required": {
                        "image": ["IMAGE"],
                        "upscale_method": [list(UPSCALE_METHODS), {}],
                        "width": ["INT", dict(_SCALE_SIZE)],
                        "height": ["INT", dict(_SCALE_SIZE)],
                        "crop": [["disabled", "center"], {}],
                    }
                }
            ),
            run=_scale,
            return_types=("IMAGE",),
        ),
        NodeDef(
            name="ImageBlur",
            display_name="Image Blur",
            category="image/postprocessing",
            python_module="comfy_extras.nodes_post_processing",
            inputs=_const(
                {
                    "required": {
                        "image": ["IMAGE"],
                        "blur_radius": ["INT", {"default": 1, "min": 1, "max": 31, "step": 1}],
                        "sigma": ["FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}],
                    }
                }
            ),
            run=_blur,
            return_types=("IMAGE",),
        ),
        NodeDef(
            name="StandinSlowSampler",
            display_name="Stand-in Slow Sampler",
            category="sampling",
            python_module="custom_nodes.comfyfleet_standin",
            description="Sleeps per step, reports progress (and previews), honours interrupt within a step.",
            inputs=_const(
                {
                    "required": {
                        "image": ["IMAGE"],
                        "steps": ["INT", {"default": 4, "min": 1, "max": 10000}],
                        "seconds_per_step": [
                            "FLOAT",
                            {"default": 0.05, "min": 0.0, "max": 60.0, "step": 0.01},
                        ],
                    }
                }
            ),
            run=_slow_sampler,
            return_types=("IMAGE",),
        ),
        NodeDef(
            name="SaveImage",
            display_name="Save Image",
            category="image",
            python_module="nodes",
            description=_SAVE_DESCRIPTION,
            inputs=_const(
                {
                    "required": {
                        "images": ["IMAGE", {"tooltip": "The images to save."}],
                        "filename_prefix": ["STRING", {"default": "ComfyUI", "tooltip": _PREFIX_TOOLTIP}],
                    },
                    "hidden": dict(_SAVE_HIDDEN),
                }
            ),
            run=_save_image,
            output_node=True,
        ),
        NodeDef(
            name="PreviewImage",
            display_name="Preview Image",
            category="image",
            python_module="nodes",
            description=_SAVE_DESCRIPTION,  # inherited from SaveImage in ComfyUI
            inputs=_const(
                {
                    "required": {"images": ["IMAGE", {"tooltip": "The images to preview."}]},
                    "hidden": dict(_SAVE_HIDDEN),
                }
            ),
            run=_preview_image,
            output_node=True,
        ),
        NodeDef(
            name="SaveImageWebsocket",
            display_name="SaveImageWebsocket",
            category="api node/image",
            python_module="custom_nodes.websocket_image_save",
            inputs=_const({"required": {"images": ["IMAGE"]}}),
            run=_save_image_websocket,
            output_node=True,
        ),
    )
}
