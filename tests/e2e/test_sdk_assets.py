"""The official comfy-sdk's asset flows against comfyfleet on both storage backends (local directory;
S3 on SeaweedFS): upload a PNG from bytes, upload it again (dedup through HEAD by-hash + from-hash:
same asset id, ``created_new`` false), and read bytes back whole and by range — an uploaded asset
and a job's output. On S3, ``/content`` answers 302 and the SDK follows it to the presigned URL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from comfy_low.models import Output as LowOutput
from comfy_sdk import AsyncComfy
from comfy_sdk.outputs import AsyncOutput

from comfyfleet.runtime import Runtime
from tests.e2e.test_sdk_end_to_end import png
from tests.fixtures.seaweedfs import SeaweedFS
from tests.support.factories import make_tenant
from tests.support.live import LiveServer, live_server
from tests.support.storage_backends import backend_settings, stored_keys
from tests.support.workflows import load_invert_save

pytestmark = pytest.mark.slow


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def service(
    backend: str, db_url: str, tmp_path: Path, comfyui_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[LiveServer, SeaweedFS | None]]:
    weed: SeaweedFS | None = request.getfixturevalue("seaweedfs") if backend == "s3" else None
    settings = backend_settings(backend, db_url, tmp_path / "data", weed, comfyui_url=comfyui_url)
    runtime = await Runtime.create(settings)
    try:
        async with live_server(runtime) as server:
            yield server, weed
    finally:
        close = getattr(runtime.storage, "close", None)
        if close is not None:
            await close()
        await runtime.close()


async def test_sdk_uploads_dedups_and_reads_back(
    service: tuple[LiveServer, SeaweedFS | None], backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, weed = service
    tenant = await make_tenant(server.runtime.engine, server.runtime.settings)
    monkeypatch.setenv("COMFY_BASE_URL", server.url)
    source = png(40, 30)
    wire: list[tuple[str, str]] = []

    async def record(request: httpx.Request) -> None:
        ours = str(request.url).startswith(server.url + "/")
        wire.append((request.method, request.url.path if ours else "<store>"))

    async with AsyncComfy(api_key=tenant.key) as client:
        # Observation only: the SDK's own httpx client, with a hook listing what goes on the wire.
        client._low._client.event_hooks["request"].append(record)

        first = client.assets.from_bytes(source, filename="photo.png", content_type="image/png")
        first_id = await first.commit()
        assert first.created_new is True
        assert [m for m, _ in wire] == ["HEAD", "POST"]

        wire.clear()
        second = client.assets.from_bytes(source, filename="photo.png", content_type="image/png")
        assert await second.commit() == first_id
        assert second.created_new is False
        assert second.hash == first.hash
        paths = [f"{m} {p}" for m, p in wire]
        assert paths == [f"HEAD /api/v2/assets/by-hash/{first.hash}", "POST /api/v2/assets/from-hash"]

        # One blob in the store for the two handles.
        keys = stored_keys(server.runtime.storage, weed, f"tenants/{tenant.id}/")
        assert keys == [f"tenants/{tenant.id}/blobs/{first.hash.removeprefix('blake3:')}"]

        # The uploaded asset's bytes, through the SDK's download code (an output handle over its id).
        meta = await client.assets.get(first_id)
        handle = AsyncOutput(
            LowOutput(
                node_id="",
                name="photo.png",
                type="image",
                content_type="image/png",
                size_bytes=len(source),
                id=first_id,
                hash=meta.hash,
                url=server.url,
                url_expires_at="2100-01-01T00:00:00Z",
            ),
            client._low,
        )
        wire.clear()
        assert await handle.to_bytes() == source
        assert await handle.to_bytes(range=(0, 7)) == source[:8]
        assert await handle.to_bytes(range=(16, 47)) == source[16:48]
        if backend == "s3":
            # Each read: the API's 302, then the presigned GET on SeaweedFS (the bytes never pass the API).
            assert wire == [("GET", f"/api/v2/assets/{first_id}/content"), ("GET", "<store>")] * 3
            download = await handle.get_download_url()
            assert weed is not None and download.url.startswith(weed.endpoint_url)
        else:
            assert wire == [("GET", f"/api/v2/assets/{first_id}/content")] * 3

        # A job's output on this backend: committed by the worker, read back whole and by range.
        workflow = client.workflows.from_json(load_invert_save({"id": "placeholder"}))
        workflow.set_input("1", "image", second)
        job = await client.run(workflow, timeout=60)
        assert job.status == "succeeded"
        (output,) = job.get_outputs("3")
        data = await output.to_bytes()
        assert len(data) == output.size_bytes and data.startswith(b"\x89PNG\r\n\x1a\n")
        assert await output.to_bytes(range=(0, 7)) == data[:8]
        assert await output.to_bytes(range=(8, len(data) - 1)) == data[8:]
