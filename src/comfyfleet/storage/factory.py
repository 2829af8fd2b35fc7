"""Build a storage backend by name, so callers wire settings without importing boto3 for ``local``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from comfyfleet.storage.base import Storage


def build_storage(kind: Literal["local", "s3"], **params: Any) -> Storage:
    """``local``: ``root``, ``signing_key`` (bytes, or str taken as UTF-8), ``public_base_url``.
    ``s3``: ``bucket`` and ``S3Storage``'s keyword arguments. Unknown parameters raise ``TypeError``."""
    if kind == "local":
        from comfyfleet.storage.local import LocalStorage

        root = Path(params.pop("root"))
        signing_key = params.pop("signing_key")
        if isinstance(signing_key, str):
            signing_key = signing_key.encode()
        return LocalStorage(root, signing_key=signing_key, **params)
    if kind == "s3":
        # Imported here: importing boto3 costs a few hundred ms that a local deployment need not pay.
        from comfyfleet.storage.s3 import S3Storage

        return S3Storage(params.pop("bucket"), **params)
    raise ValueError(f"unknown storage kind {kind!r}")
