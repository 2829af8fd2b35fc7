"""What POST /api/v2/assets refuses or rewrites: a hash mismatch stores nothing, the plan's size cap
answers 413 in the contract's envelope, a declared media type the bytes contradict is a 422, file
names lose every path part, and an Idempotency-Key replays or refuses a different file."""

from __future__ import annotations

import base64
import re
import uuid

import httpx
import pytest
from tests.integration.assets.conftest import TINY_UPLOAD, AssetEnv, AssetEnvFactory, png_bytes
from tests.support.factories import make_tenant

from comfyfleet.storage.base import content_disposition


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    error: dict[str, object] = body["error"]
    return error


async def assert_nothing_stored(env: AssetEnv) -> None:
    assert await env.blob_count(env.alice) == 0
    assert await env.asset_count(env.alice) == 0
    assert env.keys(env.alice) == []
    assert env.spool_files() == []


async def test_hash_mismatch_is_409_and_stores_nothing(env: AssetEnv) -> None:
    data = png_bytes(seed=3)
    other = "blake3:" + "ab" * 32
    response = await env.upload(env.alice, data, fields={"expected_hash": other, "file_path": "a.png"})
    assert response.status_code == 409
    error = error_of(response)
    assert error["code"] == "hash_mismatch"
    assert isinstance(error["details"], dict) and error["details"]["expected"] == other
    await assert_nothing_stored(env)

    # The right hash goes through (the refusal above was about the hash, not the upload).
    actual = error["details"]["actual"]
    response = await env.upload(env.alice, data, fields={"expected_hash": actual})
    assert response.status_code == 201 and response.json()["hash"] == actual


async def test_upload_over_the_plan_cap_is_413_in_the_envelope(env: AssetEnv) -> None:
    tiny = await make_tenant(env.runtime.engine, env.runtime.settings, "tiny", plan="tiny")
    response = await env.upload(tiny, png_bytes(seed=4) + b"\0" * (TINY_UPLOAD + 1))
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"
    assert env.spool_files() == []
    assert env.keys(tiny) == []
    # At the cap exactly it is accepted.
    data = png_bytes(seed=4)
    response = await env.upload(tiny, data + b"\0" * (TINY_UPLOAD - len(data)))
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("where", ["part", "field"])
async def test_declared_png_that_is_not_a_png_is_refused(env: AssetEnv, where: str) -> None:
    jpeg = b"\xff\xd8\xff\xe0" + b"\0" * 64
    if where == "part":
        response = await env.upload(env.alice, jpeg, part_type="image/png")
    else:
        response = await env.upload(
            env.alice,
            b"just text",
            part_type="application/octet-stream",
            fields={"content_type": "image/png"},
        )
    assert response.status_code == 422
    assert error_of(response)["code"] == "content_type_mismatch"
    await assert_nothing_stored(env)


async def test_content_type_is_sniffed_from_the_bytes(env: AssetEnv) -> None:
    # Declared as a generic type, recorded as what the magic bytes say.
    response = await env.upload(
        env.alice, png_bytes(seed=5), filename="x.bin", part_type="application/octet-stream"
    )
    assert response.status_code == 201
    assert response.json()["content_type"] == "image/png"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("../../x.png", "x.png"), ("a/b\\c.png", "c.png"), ("/etc/passwd", "passwd"), ("..", "file")],
)
@pytest.mark.parametrize("where", ["filename", "file_path"])
async def test_file_names_keep_no_path_parts(env: AssetEnv, raw: str, expected: str, where: str) -> None:
    data = png_bytes(seed=6)
    if where == "filename":
        response = await env.upload(env.alice, data, filename=raw)
    else:
        response = await env.upload(env.alice, data, filename="ignored.png", fields={"file_path": raw})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["file_path"] == expected
    blob_hex = body["hash"].removeprefix("blake3:")
    # Storage keys are built from the tenant and the hash alone: no name reaches them.
    assert env.keys(env.alice) == [f"tenants/{env.alice.id}/blobs/{blob_hex}"]

    minted = await env.client.post(
        "/api/v2/assets/from-hash",
        json={"hash": body["hash"], "file_path": raw + ".2"},
        headers=env.alice.headers,
    )
    assert minted.status_code == 200 and "/" not in minted.json()["file_path"]
    assert "\\" not in minted.json()["file_path"]


async def test_any_file_name_makes_a_valid_download_header(env: AssetEnv) -> None:
    name = 'rapport "final" été 画像.png'
    response = await env.upload(env.alice, png_bytes(seed=7), fields={"file_path": name})
    assert response.status_code == 201, response.text
    asset = response.json()
    name = asset["file_path"]
    assert name == "rapport _final_ été 画像.png"  # quotes go, letters of any script stay
    content = await env.client.get(f"/api/v2/assets/{asset['id']}/content", headers=env.alice.headers)
    if env.backend == "s3":
        # The presigned URL asks the store to send the header; fetch it from the store itself.
        assert content.status_code == 302
        async with httpx.AsyncClient() as direct:
            content = await direct.get(content.headers["location"])
    assert content.status_code == 200
    # RFC 6266: an ASCII fallback plus the exact name in filename*, whatever the disposition type.
    disposition = content.headers["content-disposition"]
    assert disposition.split(";", 1)[1] == content_disposition(name).split(";", 1)[1]


async def test_idempotency_key_replays_and_refuses_another_file(env: AssetEnv) -> None:
    key = str(uuid.uuid4())
    data = png_bytes(seed=8)
    first = await env.upload(env.alice, data, headers={"Idempotency-Key": key})
    assert first.status_code == 201
    replay = await env.upload(env.alice, data, headers={"Idempotency-Key": key})
    assert replay.status_code == 201
    assert replay.headers["idempotency-replayed"] == "true"
    assert replay.json()["id"] == first.json()["id"]
    assert replay.json()["created_new"] is True  # the first answer, replayed

    reuse = await env.upload(env.alice, png_bytes(seed=9), headers={"Idempotency-Key": key})
    assert reuse.status_code == 422
    assert error_of(reuse)["code"] == "idempotency_key_reuse"
    assert await env.asset_count(env.alice) == 1
    assert len(env.keys(env.alice)) == 1
    assert env.spool_files() == []

    # Without the key the same bytes are a dedup hit: 200, created_new false.
    again = await env.upload(env.alice, data)
    assert again.status_code == 200 and again.json()["created_new"] is False
    assert again.json()["id"] == first.json()["id"]


async def test_inline_bytes_only_on_request_and_only_when_small(make_env: AssetEnvFactory) -> None:
    env = await make_env(inline_max_bytes=1024)
    small = png_bytes(seed=10)
    assert len(small) <= 1024
    big = png_bytes(seed=11) + bytes(range(256)) * 8
    small_id = (await env.upload(env.alice, small)).json()["id"]
    big_id = (await env.upload(env.alice, big)).json()["id"]
    headers = env.alice.headers

    plain = (await env.client.get(f"/api/v2/assets/{small_id}", headers=headers)).json()
    assert "data_base64" not in plain

    inline = await env.client.get(f"/api/v2/assets/{small_id}", params={"inline": "true"}, headers=headers)
    assert inline.status_code == 200
    assert base64.b64decode(inline.json()["data_base64"]) == small

    too_big = await env.client.get(f"/api/v2/assets/{big_id}", params={"inline": "true"}, headers=headers)
    assert too_big.status_code == 422
    error = error_of(too_big)
    assert error["code"] == "inline_too_large"
    assert error["details"] == {"size_bytes": len(big), "inline_max_bytes": 1024}

    # Inline never bypasses isolation: bob asking for alice's small asset gets the usual 404.
    foreign = await env.client.get(
        f"/api/v2/assets/{small_id}", params={"inline": "true"}, headers=env.bob.headers
    )
    assert foreign.status_code == 404 and re.search(small_id, foreign.text) is None
