"""The storage backend the settings ask for."""

from __future__ import annotations

from comfyfleet.config import Settings
from comfyfleet.storage.base import Storage


def storage_from_settings(settings: Settings) -> Storage:
    if settings.storage == "s3":
        from comfyfleet.storage.s3 import S3Storage

        return S3Storage(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            access_key_id=settings.s3_access_key_id.get_secret_value() or None,
            secret_access_key=settings.s3_secret_access_key.get_secret_value() or None,
            region=settings.s3_region,
            addressing_style=settings.s3_addressing_style,
        )
    from comfyfleet.storage.local import LocalStorage

    return LocalStorage(
        settings.data_dir / "storage",
        signing_key=settings.secret_bytes("url_signing_key"),
        public_base_url=(settings.public_base_url or "http://127.0.0.1:8189").rstrip("/"),
    )
