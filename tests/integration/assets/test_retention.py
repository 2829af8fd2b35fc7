"""Retention: expired assets go; a blob goes only when no remaining asset of its tenant points to it
(dedup shares one blob between assets), and then its object goes from storage too."""

from __future__ import annotations

from datetime import datetime, timedelta

from tests.integration.assets.conftest import AssetEnv, png_bytes

from comfyfleet.assets import repository as repo
from comfyfleet.assets import retention, service
from comfyfleet.queue.reaper import reap_once


async def test_retention_keeps_shared_blobs_and_removes_expired_ones(env: AssetEnv) -> None:
    data = png_bytes(seed=40)
    first = (await env.upload(env.alice, data, filename="first.png")).json()
    blob_hash = first["hash"]
    key = f"tenants/{env.alice.id}/blobs/{blob_hash.removeprefix('blake3:')}"
    first_expiry = datetime.fromisoformat(first["expires_at"])
    # A second asset over the same blob, kept twice as long (as a longer-lived job's input would be).
    async with env.runtime.engine.begin() as conn:
        second, created = await service.record_asset(
            conn,
            tenant_id=env.alice.id,
            blob_hash=blob_hash,
            size=len(data),
            content_type="image/png",
            file_path="second.png",
            tags=None,
            expires_at=first_expiry + timedelta(days=7),
        )
    assert created
    # Bob's copy of the same bytes is his own blob and must not count for alice's, nor go with it.
    bob_asset = (await env.upload(env.bob, data)).json()
    assert env.keys(env.alice) == [key]
    assert await env.blob_count(env.alice) == 1

    # Before anything expires nothing goes.
    assert await retention.cleanup(env.runtime, first_expiry - timedelta(seconds=1)) == 0

    # The first asset expires: it goes, the blob stays for the second.
    removed = await retention.cleanup(env.runtime, first_expiry + timedelta(seconds=1))
    assert removed >= 1
    async with env.runtime.engine.connect() as conn:
        assert await repo.get_asset(conn, env.alice.id, first["id"]) is None
        assert await repo.get_asset(conn, env.alice.id, second.id) is not None
        assert await repo.get_blob(conn, env.alice.id, blob_hash) is not None
    assert env.keys(env.alice) == [key]
    # Bob's asset over the same bytes expired at the same time: his blob was his tenant's last
    # reference and went, while alice's blob with the same hash stayed for her second asset.
    assert env.keys(env.bob) == []
    async with env.runtime.engine.connect() as conn:
        assert await repo.get_asset(conn, env.bob.id, bob_asset["id"]) is None
    content = await env.client.get(f"/api/v2/assets/{second.id}/content", headers=env.alice.headers)
    assert content.status_code == (302 if env.backend == "s3" else 200)
    if env.backend == "local":
        assert content.content == data

    # The second expires too (through the reaper, as in production): blob row and object go.
    assert second.expires_at is not None
    report = await reap_once(env.runtime, second.expires_at + timedelta(seconds=1))
    assert report.retention_deleted >= 1
    async with env.runtime.engine.connect() as conn:
        assert await repo.get_asset(conn, env.alice.id, second.id) is None
        assert await repo.get_blob(conn, env.alice.id, blob_hash) is None
    assert env.keys(env.alice) == []
    head = await env.client.head(f"/api/v2/assets/by-hash/{blob_hash}", headers=env.alice.headers)
    assert head.status_code == 404


async def test_reupload_after_expiry_stores_the_bytes_again(env: AssetEnv) -> None:
    data = png_bytes(seed=41)
    first = (await env.upload(env.alice, data)).json()
    expiry = datetime.fromisoformat(first["expires_at"])
    await retention.cleanup(env.runtime, expiry + timedelta(seconds=1))
    assert env.keys(env.alice) == []

    again = await env.upload(env.alice, data)
    assert again.status_code == 201 and again.json()["created_new"] is True
    assert len(env.keys(env.alice)) == 1
