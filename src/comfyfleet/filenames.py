"""Safe file names: what survives of a caller's name into storage keys, ComfyUI's folders and
download headers."""

from __future__ import annotations

import re
import unicodedata

# Word characters (any script) and a few harmless punctuation marks. '%' stays so ComfyUI's
# %width%/%year% substitutions keep working in prefixes; brackets go, since "name.png [output]" is
# ComfyUI's syntax for reading from another folder.
_UNSAFE_CHARS = re.compile(r"[^\w\-.()+,=@% ]")
_EXTENSION_MAX_CHARS = 16


def sanitize_filename(name: str, *, default: str = "file", max_bytes: int = 120) -> str:
    """One safe path segment from ``name``: the last path part only, no control or format characters
    (bidi overrides, zero-width), no leading dots, at most ``max_bytes`` of UTF-8 with the extension
    kept. Returns ``default`` when nothing usable is left."""
    leaf = re.split(r"[/\\]", name)[-1]
    leaf = unicodedata.normalize("NFC", leaf)
    leaf = "".join(ch for ch in leaf if not unicodedata.category(ch).startswith("C"))
    leaf = _UNSAFE_CHARS.sub("_", leaf)
    leaf = re.sub(r"\s+", " ", leaf).strip(" .")
    if not leaf:
        return default
    if len(leaf.encode()) <= max_bytes:
        return leaf
    stem, dot, extension = leaf.rpartition(".")
    if not dot or not stem or len(extension) > _EXTENSION_MAX_CHARS:
        return _truncate_utf8(leaf, max_bytes).rstrip(" .") or default
    suffix = f".{extension}"
    stem = _truncate_utf8(stem, max_bytes - len(suffix.encode())).rstrip(" .")
    return stem + suffix if stem else default


def _truncate_utf8(text: str, max_bytes: int) -> str:
    return text.encode()[: max(max_bytes, 0)].decode(errors="ignore")
