"""Tenant isolation on every asset route: another tenant's asset id or blob hash answers exactly like
one that does not exist (same status, same body), and dedup never crosses tenants."""

from __future__ import annotations

import uuid

import httpx
from tests.integration.assets.conftest import AssetEnv, png_bytes


def same_answer(foreign: httpx.Response, missing: httpx.Response) -> None:
    assert foreign.status_code == missing.status_code
    assert foreign.content == missing.content
    assert foreign.headers.get("content-type") == missing.headers.get("content-type")


async def test_foreign_ids_and_hashes_answer_like_missing_ones(env: AssetEnv) -> None:
    data = png_bytes(seed=1)
    uploaded = await env.upload(env.alice, data)
    assert uploaded.status_code == 201, uploaded.text
    alice_asset = uploaded.json()
    foreign_id, foreign_hash = alice_asset["id"], alice_asset["hash"]
    missing_id = str(uuid.uuid4())
    missing_hash = "blake3:" + "0" * 64
    bob = env.bob.headers
    client = env.client

    # GET metadata, GET content (whole and by range).
    for suffix, headers in (("", {}), ("/content", {}), ("/content", {"Range": "bytes=0-7"})):
        foreign = await client.get(f"/api/v2/assets/{foreign_id}{suffix}", headers={**bob, **headers})
        missing = await client.get(f"/api/v2/assets/{missing_id}{suffix}", headers={**bob, **headers})
        assert missing.status_code == 404
        same_answer(foreign, missing)

    # HEAD by-hash: the SDK's dedup probe must not reveal another tenant's bytes.
    foreign = await client.head(f"/api/v2/assets/by-hash/{foreign_hash}", headers=bob)
    missing = await client.head(f"/api/v2/assets/by-hash/{missing_hash}", headers=bob)
    assert missing.status_code == 404
    same_answer(foreign, missing)

    # from-hash: minting an asset over another tenant's blob is a missing blob.
    foreign = await client.post("/api/v2/assets/from-hash", json={"hash": foreign_hash}, headers=bob)
    missing = await client.post("/api/v2/assets/from-hash", json={"hash": missing_hash}, headers=bob)
    assert missing.status_code == 404
    same_answer(foreign, missing)

    # Alice still sees her asset: the 404s above were isolation, not breakage.
    assert (await client.get(f"/api/v2/assets/{foreign_id}", headers=env.alice.headers)).status_code == 200


async def test_dedup_and_idempotency_keys_stay_inside_a_tenant(env: AssetEnv) -> None:
    data = png_bytes(seed=2)
    key = str(uuid.uuid4())
    first = await env.upload(env.alice, data, headers={"Idempotency-Key": key})
    assert first.status_code == 201

    # The same bytes under the same Idempotency-Key from another tenant: a fresh upload of bob's own,
    # neither a replay of alice's answer nor a key-reuse error.
    theirs = await env.upload(env.bob, data, headers={"Idempotency-Key": key})
    assert theirs.status_code == 201, theirs.text
    body = theirs.json()
    assert body["created_new"] is True
    assert body["id"] != first.json()["id"]
    assert "idempotency-replayed" not in theirs.headers

    # Each tenant has its own copy of the blob, under its own key prefix.
    blob_hex = body["hash"].removeprefix("blake3:")
    assert env.keys(env.alice) == [f"tenants/{env.alice.id}/blobs/{blob_hex}"]
    assert env.keys(env.bob) == [f"tenants/{env.bob.id}/blobs/{blob_hex}"]
    assert await env.blob_count(env.alice) == 1 and await env.blob_count(env.bob) == 1

    # Bob's own copy dedups for bob.
    head = await env.client.head(f"/api/v2/assets/by-hash/{body['hash']}", headers=env.bob.headers)
    assert head.status_code == 200
