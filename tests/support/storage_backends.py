"""Settings and inspection helpers for tests that run once per storage backend (local directory and
S3 on SeaweedFS). Inspection goes around the code under test: a directory walk, a plain boto3 client."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from comfyfleet.config import Settings
from comfyfleet.storage.local import LocalStorage
from tests.conftest import make_settings
from tests.fixtures.seaweedfs import SeaweedFS

BACKENDS = ("local", "s3")


def backend_settings(
    backend: str, db_url: str, data_dir: Path, seaweedfs: SeaweedFS | None, **overrides: Any
) -> Settings:
    if backend == "s3":
        assert seaweedfs is not None
        overrides = {
            "storage": "s3",
            "s3_bucket": seaweedfs.bucket,
            "s3_endpoint_url": seaweedfs.endpoint_url,
            "s3_access_key_id": seaweedfs.access_key_id,
            "s3_secret_access_key": seaweedfs.secret_access_key,
            "s3_region": seaweedfs.region,
            "s3_addressing_style": "path",
            **overrides,
        }
    return make_settings(db_url, data_dir, **overrides)


def stored_keys(storage: object, seaweedfs: SeaweedFS | None, prefix: str) -> list[str]:
    """Every key under ``prefix`` as the backend itself has it (files on disk, objects in the bucket)."""
    if isinstance(storage, LocalStorage):
        root = storage.root / prefix
        if not root.exists():
            return []
        return sorted(
            str(Path(dirpath, name).relative_to(storage.root)).replace(os.sep, "/")
            for dirpath, _dirs, files in os.walk(root)
            for name in files
        )
    assert seaweedfs is not None
    client = seaweedfs.client()
    try:
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=seaweedfs.bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)
    finally:
        client.close()
