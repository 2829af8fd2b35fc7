"""File naming and path rules, as ComfyUI 0.8.0 applies them (PROTOCOL.md section 5)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .config import Dirs

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
_ANNOTATION = re.compile(r"^(?P<name>.*) \[(?P<kind>input|output|temp)\]$")


def split_annotation(name: str) -> tuple[str, str | None]:
    """``"x.png [output]"`` -> ``("x.png", "output")``: ComfyUI lets a file name pick its folder."""
    match = _ANNOTATION.match(name)
    if match is None:
        return name, None
    return match.group("name"), match.group("kind")


def annotated_path(dirs: Dirs, name: str, default: str = "input") -> Path:
    plain, kind = split_annotation(name)
    base = dirs.by_type(kind or default)
    assert base is not None
    return Path(os.path.join(base, plain))


def inside(base: Path, candidate: Path) -> bool:
    """The traversal check ComfyUI uses: absolute paths (not resolved), common prefix equals base."""
    base_abs = os.path.abspath(base)
    return os.path.commonpath((base_abs, os.path.abspath(candidate))) == base_abs


def input_files(dirs: Dirs) -> list[str]:
    """What LoadImage offers in object_info: image files directly in the input folder."""
    if not dirs.input.is_dir():
        return []
    return sorted(p.name for p in dirs.input.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def substitute_vars(prefix: str, width: int, height: int, now: datetime | None = None) -> str:
    """Server-side prefix variables; ``%batch_num%`` is left for SaveImage to fill per image."""
    if "%" not in prefix:
        return prefix
    now = now or datetime.now()
    values = {
        "%width%": str(width),
        "%height%": str(height),
        "%year%": str(now.year),
        "%month%": f"{now.month:02}",
        "%day%": f"{now.day:02}",
        "%hour%": f"{now.hour:02}",
        "%minute%": f"{now.minute:02}",
        "%second%": f"{now.second:02}",
    }
    for key, value in values.items():
        prefix = prefix.replace(key, value)
    return prefix


@dataclass(frozen=True)
class SaveTarget:
    folder: Path
    basename: str
    counter: int
    subfolder: str


def next_counter(folder: Path, basename: str) -> int:
    """One more than the largest ``{basename}_{N}_`` counter in the folder (1 when there is none).

    The scan uses the basename as given, so a ``%batch_num%`` basename never matches an existing
    file and always starts at 1 -- the same quirk the real server has.
    """
    pattern = re.compile(re.escape(basename) + r"_(\d+)_")
    best = 0
    for entry in os.listdir(folder):
        match = pattern.match(entry)
        if match is not None:
            best = max(best, int(match.group(1)))
    return best + 1


def save_target(prefix: str, base: Path, width: int, height: int) -> SaveTarget:
    prefix = substitute_vars(prefix, width, height)
    normalized = os.path.normpath(prefix)
    subfolder = os.path.dirname(normalized)
    basename = os.path.basename(normalized)
    folder = Path(os.path.join(base, subfolder))
    if not inside(base, folder):
        raise ValueError(
            "Saving image outside the output folder is not allowed.\n"
            f" full_output_folder: {os.path.abspath(folder)}\n output_dir: {base}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    return SaveTarget(
        folder=folder, basename=basename, counter=next_counter(folder, basename), subfolder=subfolder
    )
