"""Which contract output type a ComfyUI output file is."""

from __future__ import annotations

import mimetypes

_BY_MEDIA = {
    "images": "image",
    "gifs": "video",
    "videos": "video",
    "video": "video",
    "audio": "audio",
    "text": "text",
    "latents": "latent",
    "3d": "file",
    "meshes": "file",
}
_BY_EXTENSION = {".latent": "latent", ".safetensors": "file", ".txt": "text", ".json": "text"}


def output_type(media: str, filename: str) -> str:
    extension = "." + filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if extension in _BY_EXTENSION:
        return _BY_EXTENSION[extension]
    guessed = mimetypes.guess_type(filename)[0] or ""
    for family in ("image", "video", "audio"):
        if guessed.startswith(family + "/"):
            # An animated WebP/GIF saved by a video node is still a video to the client.
            return "video" if media in ("gifs", "videos") else family
    return _BY_MEDIA.get(media, "file")
