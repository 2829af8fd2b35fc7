"""The worker's side of the asset service against a failing backend: output commits retry storage
errors, then surface as ``Retryable`` with nothing recorded (no base64 fallback, no half-made asset);
a failing input stage is ``Retryable`` too and leaves no partial file.

The failures come from a wrapper around the real backend (local directory or SeaweedFS): only the
storage's answers are faked, the service under test is the project's own."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from tests.integration.assets.conftest import AssetEnv, AssetEnvFactory, png_bytes

from comfyfleet.assets import service
from comfyfleet.assets.repository import AssetRow
from comfyfleet.errors import Retryable
from comfyfleet.storage.base import SignedUrl, Storage, StorageError
from comfyfleet.timeutil import utcnow


class FailingStorage:
    """Delegates to a real backend; the first ``put_failures`` uploads and every read while
    ``reads_fail`` raise ``StorageError`` as a network or disk failure would."""

    def __init__(self, inner: Storage, *, put_failures: int = 0, reads_fail: bool = False) -> None:
        self.inner = inner
        self.put_failures = put_failures
        self.reads_fail = reads_fail
        self.put_calls = 0

    async def put_file(self, key: str, path: str, content_type: str, *, consume: bool = False) -> None:
        self.put_calls += 1
        if self.put_calls <= self.put_failures:
            raise StorageError(f"injected failure {self.put_calls} putting {key}")
        await self.inner.put_file(key, path, content_type, consume=consume)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    async def size(self, key: str) -> int:
        return await self.inner.size(key)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def open_read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        first = True
        async for chunk in self.inner.open_read(key, start, end):
            yield chunk
            if first and self.reads_fail:
                raise StorageError("injected failure: connection reset mid-stream")
            first = False

    async def get_to_file(self, key: str, path: str) -> None:
        await self.inner.get_to_file(key, path)

    async def download_url(self, key: str, *, filename: str, content_type: str, lifetime_s: int) -> SignedUrl:
        return await self.inner.download_url(
            key, filename=filename, content_type=content_type, lifetime_s=lifetime_s
        )


def failing(env: AssetEnv, **kwargs: int | bool) -> FailingStorage:
    wrapper = FailingStorage(env.runtime.storage, **kwargs)  # type: ignore[arg-type]
    env.runtime.storage = wrapper
    return wrapper


async def commit(env: AssetEnv, path: Path, job_id: str) -> AssetRow:
    asset = await service.commit_output(
        env.runtime,
        tenant_id=env.alice.id,
        job_id=job_id,
        job_expires_at=utcnow() + timedelta(days=1),
        path=path,
        node_id="9",
        output_type="image",
        name="../out/ComfyUI_00001_.png",
    )
    assert asset is not None  # no guard given, so always recorded
    return asset


async def test_commit_retries_storage_errors_then_succeeds(make_env: AssetEnvFactory, tmp_path: Path) -> None:
    env = await make_env(storage_retries=3)
    storage = failing(env, put_failures=2)
    data = png_bytes(seed=30)
    produced = tmp_path / "ComfyUI_00001_.png"
    produced.write_bytes(data)
    job_id = str(uuid.uuid4())

    asset = await commit(env, produced, job_id)

    assert storage.put_calls == 3
    assert (asset.job_id, asset.node_id, asset.output_type) == (job_id, "9", "image")
    assert asset.file_path == "ComfyUI_00001_.png"  # no folder of the produced name survives
    assert (asset.content_type, asset.size_bytes) == ("image/png", len(data))
    assert env.keys(env.alice) == [f"tenants/{env.alice.id}/blobs/{asset.hash.removeprefix('blake3:')}"]
    content = await env.client.get(
        f"/api/v2/assets/{asset.id}/content", headers=env.alice.headers, follow_redirects=False
    )
    assert content.status_code == (302 if env.backend == "s3" else 200)


async def test_commit_surfaces_retryable_after_the_last_retry(
    make_env: AssetEnvFactory, tmp_path: Path
) -> None:
    env = await make_env(storage_retries=3)
    storage = failing(env, put_failures=100)
    produced = tmp_path / "ComfyUI_00001_.png"
    produced.write_bytes(png_bytes(seed=31))

    with pytest.raises(Retryable) as caught:
        await commit(env, produced, str(uuid.uuid4()))

    assert storage.put_calls == 3
    assert caught.value.code == "retryable" and caught.value.status_code == 503
    assert isinstance(caught.value.__cause__, StorageError)
    # Nothing stands in for the missing upload: no asset row (so no output in the job), no blob row,
    # no object; the produced file is still there for the job's next attempt.
    assert await env.asset_count(env.alice) == 0
    assert await env.blob_count(env.alice) == 0
    assert env.keys(env.alice) == []
    assert produced.exists()


async def test_stage_failure_is_retryable_and_leaves_no_partial_file(env: AssetEnv, tmp_path: Path) -> None:
    data = png_bytes(seed=32, width=600, height=600)  # more than one read chunk on both backends
    uploaded = (await env.upload(env.alice, data)).json()
    async with env.runtime.engine.connect() as conn:
        asset = await service.get_asset(conn, env.alice.id, uploaded["id"])

    destination = tmp_path / "job" / "input" / "photo.png"
    await service.stage_asset(env.runtime, asset, destination)
    assert destination.read_bytes() == data

    failing(env, reads_fail=True)
    retry = tmp_path / "job2" / "input" / "photo.png"
    with pytest.raises(Retryable):
        await service.stage_asset(env.runtime, asset, retry)
    assert list(retry.parent.iterdir()) == []
