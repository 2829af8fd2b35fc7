"""The official comfy-sdk against comfyfleet and the ComfyUI stand-in: upload an input, run
LoadImage → ImageInvert → SaveImage, download the output, check its pixels are the inverse."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from comfy_sdk import AsyncComfy
from PIL import Image

from comfyfleet.runtime import Runtime
from tests.conftest import make_settings
from tests.support.factories import make_tenant
from tests.support.live import LiveServer, live_server
from tests.support.workflows import load_invert_save

pytestmark = pytest.mark.slow


def png(width: int = 16, height: int = 12) -> bytes:
    image = Image.new("RGB", (width, height))
    image.putdata(
        [((x * 13) % 256, (y * 29) % 256, (x * y) % 256) for y in range(height) for x in range(width)]
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest_asyncio.fixture
async def service(db_url: str, tmp_path: Path, comfyui_url: str) -> AsyncIterator[LiveServer]:
    settings = make_settings(db_url, tmp_path / "data", comfyui_url=comfyui_url)
    runtime = await Runtime.create(settings)
    try:
        async with live_server(runtime) as server:
            yield server
    finally:
        await runtime.close()


async def sdk(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> AsyncComfy:
    tenant = await make_tenant(server.runtime.engine, server.runtime.settings)
    monkeypatch.setenv("COMFY_BASE_URL", server.url)
    return AsyncComfy(api_key=tenant.key)


async def test_upload_run_and_download_inverted_pixels(
    service: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = png()
    async with await sdk(service, monkeypatch) as client:
        asset = client.assets.from_bytes(source, filename="photo.png", content_type="image/png")
        workflow = client.workflows.from_json(load_invert_save({"id": "placeholder"}))
        workflow.set_input("1", "image", asset)
        job = await client.run(workflow, timeout=60)
        assert job.status == "succeeded"
        (output,) = job.get_outputs("3")
        assert output.type == "image" and output.content_type == "image/png" and output.size_bytes > 0
        data = await output.to_bytes()
        first_bytes = await output.to_bytes(range=(0, 7))
    assert first_bytes == data[:8]
    original = Image.open(io.BytesIO(source)).convert("RGB")
    inverted = Image.open(io.BytesIO(data)).convert("RGB")
    assert inverted.size == original.size
    assert all(
        tuple(255 - c for c in a) == tuple(b)
        for a, b in zip(original.getdata(), inverted.getdata(), strict=True)
    )
