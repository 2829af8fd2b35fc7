"""Download URLs: the local backend's HMAC-signed URLs are served by the API and refused once expired
or altered; S3 presigned URLs (SeaweedFS) download the right bytes, whole and by range, and
``/content`` redirects to one."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from tests.conftest import TEST_SECRETS
from tests.integration.assets.conftest import AssetEnv, AssetEnvFactory, png_bytes

from comfyfleet.storage.local import URL_PATH, LocalStorage

LIFETIME_S = 120


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.mark.parametrize("backend", ["local"])
async def test_local_signed_url_is_refused_once_expired_or_altered(
    make_env: AssetEnvFactory, tmp_path: Path
) -> None:
    clock = Clock()
    storage = LocalStorage(
        tmp_path / "data" / "storage",
        signing_key=TEST_SECRETS["url_signing_key"].encode(),
        public_base_url="http://testserver",
        clock=clock,
    )
    env = await make_env(storage=storage, url_lifetime_s=LIFETIME_S)
    data = png_bytes(seed=20, width=40)
    asset = (await env.upload(env.alice, data)).json()
    meta = (await env.client.get(f"/api/v2/assets/{asset['id']}", headers=env.alice.headers)).json()
    url = urlsplit(meta["url"])
    assert url.path.startswith(URL_PATH)
    token = url.path.removeprefix(URL_PATH)

    async def fetch(token: str, **headers: str) -> httpx.Response:
        # No Authorization header: the URL is the only credential.
        return await env.client.get(URL_PATH + token, headers=headers)

    whole = await fetch(token)
    assert whole.status_code == 200 and whole.content == data
    part = await fetch(token, Range="bytes=8-15")
    assert part.status_code == 206 and part.content == data[8:16]

    payload, mac = token.split(".")
    key, expires_at, filename, content_type = json.loads(unb64(payload))
    other_key = f"tenants/{env.bob.id}/blobs/{asset['hash'].removeprefix('blake3:')}"

    def payload_of(*fields: object) -> str:
        return b64(json.dumps(list(fields)).encode())

    altered = {
        "later expiry": payload_of(key, expires_at + 3600, filename, content_type) + "." + mac,
        "another key": payload_of(other_key, expires_at, filename, content_type) + "." + mac,
        "flipped mac": payload + "." + mac[:-1] + ("A" if mac[-1] != "A" else "B"),
        "no mac": payload,
        "empty mac": payload + ".",
        "garbage": "not-a-token",
    }
    for what, bad in altered.items():
        refused = await fetch(bad)
        assert refused.status_code == 403, what
        assert refused.json()["error"]["code"] == "invalid_signature", what

    clock.now += LIFETIME_S  # the last second of validity has passed
    expired = await fetch(token)
    assert expired.status_code == 403
    assert expired.json()["error"]["code"] == "url_expired"

    # A fresh GET of the asset signs a fresh URL that works again.
    meta = (await env.client.get(f"/api/v2/assets/{asset['id']}", headers=env.alice.headers)).json()
    assert (await env.client.get(urlsplit(meta["url"]).path)).content == data


@pytest.mark.parametrize("backend", ["s3"])
async def test_presigned_s3_url_downloads_the_right_bytes(env: AssetEnv) -> None:
    data = png_bytes(seed=21, width=64, height=64)
    asset = (await env.upload(env.alice, data, filename="shot.png")).json()
    assert env.seaweedfs is not None
    async with httpx.AsyncClient() as direct:
        # The URL in the upload answer, and a fresh one from GET: both presigned on SeaweedFS.
        meta = (await env.client.get(f"/api/v2/assets/{asset['id']}", headers=env.alice.headers)).json()
        for url in (asset["url"], meta["url"]):
            assert url.startswith(env.seaweedfs.endpoint_url) and "X-Amz-Signature=" in url
            whole = await direct.get(url)
            assert whole.status_code == 200 and whole.content == data
            assert whole.headers["content-type"] == "image/png"
            part = await direct.get(url, headers={"Range": "bytes=10-19"})
            assert part.status_code == 206 and part.content == data[10:20]

        # /content answers with a redirect to a fresh presigned URL, never with the bytes.
        content = await env.client.get(f"/api/v2/assets/{asset['id']}/content", headers=env.alice.headers)
        assert content.status_code == 302
        followed = await direct.get(content.headers["location"])
        assert followed.content == data

        # The signature covers the key: pointing the URL at another object is refused by the store.
        tampered = meta["url"].replace(asset["hash"].removeprefix("blake3:"), "0" * 64)
        assert (await direct.get(tampered)).status_code == 403


@pytest.mark.parametrize("backend", ["local"])
async def test_local_content_ranges(env: AssetEnv) -> None:
    data = png_bytes(seed=22, width=30)
    asset = (await env.upload(env.alice, data)).json()
    url, headers = f"/api/v2/assets/{asset['id']}/content", env.alice.headers

    whole = await env.client.get(url, headers=headers)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["accept-ranges"] == "bytes"
    suffix = await env.client.get(url, headers={**headers, "Range": "bytes=-5"})
    assert suffix.status_code == 206 and suffix.content == data[-5:]
    assert suffix.headers["content-range"] == f"bytes {len(data) - 5}-{len(data) - 1}/{len(data)}"
    past_end = await env.client.get(url, headers={**headers, "Range": f"bytes=10-{len(data) + 100}"})
    assert past_end.status_code == 206 and past_end.content == data[10:]
    outside = await env.client.get(url, headers={**headers, "Range": f"bytes={len(data)}-"})
    assert outside.status_code == 416
    assert outside.headers["content-range"] == f"bytes */{len(data)}"
    assert outside.json()["error"]["code"] == "range_not_satisfiable"
    # A multi-range is answered with the whole content, which is always allowed.
    multi = await env.client.get(url, headers={**headers, "Range": "bytes=0-1,4-5"})
    assert multi.status_code == 200 and multi.content == data
