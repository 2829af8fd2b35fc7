"""A 2 GB upload streams through the API with flat memory: the server runs as its own process
(`comfyfleet api`), the client generates the body on the fly, and the server's peak RSS (VmHWM from
/proc) may grow by at most ``HEADROOM`` over its peak before the upload. Memory, not time, is asserted."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import blake3
import httpx
import pytest
from tests.conftest import TEST_SECRETS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc"),
]

SIZE = 2 * 1024**3
BLOCK = 1024**2
HEADROOM = 200 * 1024**2
BOUNDARY = "comfyfleet-large-upload-boundary"
PLANS = {"big": {"max_upload_bytes": 3 * 1024**3}}


def peak_rss(pid: int) -> int:
    """The process's high-water RSS in bytes (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str, int, Path]]:
    """`comfyfleet api` on SQLite and local storage; yields (url, api key, pid, data dir)."""
    data_dir = tmp_path / "data"
    exe = str(Path(sys.executable).parent / "comfyfleet")
    env = {
        **os.environ,
        **{f"COMFYFLEET_{name.upper()}": value for name, value in TEST_SECRETS.items()},
        "COMFYFLEET_ENV": "test",
        "COMFYFLEET_DATA_DIR": str(data_dir),
        "COMFYFLEET_PLANS": json.dumps(PLANS),
    }
    run = {"env": env, "check": True, "capture_output": True, "text": True, "timeout": 60}
    subprocess.run([exe, "db", "upgrade"], **run)  # type: ignore[call-overload]
    subprocess.run([exe, "tenants", "create", "big", "--plan", "big"], **run)  # type: ignore[call-overload]
    key = subprocess.run([exe, "keys", "create", "big"], **run).stdout.strip()  # type: ignore[call-overload]
    port = free_port()
    process = subprocess.Popen([exe, "api", "--port", str(port)], env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if process.poll() is not None:
                raise AssertionError(f"`comfyfleet api` exited with {process.returncode}")
            try:
                if httpx.get(f"{url}/api/v2/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        else:
            raise AssertionError("`comfyfleet api` did not become healthy")
        yield url, key, process.pid, data_dir
    finally:
        process.terminate()
        process.wait(15)
        # Two copies of 2 GB (spool, store) must not outlive the test in pytest's kept tmp dirs.
        shutil.rmtree(data_dir, ignore_errors=True)


def multipart_head(filename: str) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file_path"\r\n\r\n{filename}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


async def post_generated(url: str, key: str, size: int, hasher: blake3.blake3) -> httpx.Response:
    """POST a ``size``-byte file made block by block while sending: the client never holds it."""
    head = multipart_head("big.bin")
    block = bytearray(os.urandom(BLOCK))

    async def body() -> AsyncIterator[bytes]:
        yield head
        sent = 0
        while sent < size:
            # Each block differs from the last (a counter in its first bytes), as real data would.
            block[:8] = sent.to_bytes(8, "little")
            piece = bytes(block[: min(BLOCK, size - sent)])
            hasher.update(piece)
            sent += len(piece)
            yield piece
        yield TAIL

    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(len(head) + size + len(TAIL)),
    }
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        return await client.post(f"{url}/api/v2/assets", content=body(), headers=headers)


@pytest.mark.timeout(900)
async def test_two_gigabyte_upload_keeps_server_memory_flat(server: tuple[str, str, int, Path]) -> None:
    url, key, pid, data_dir = server
    # Warm-up: imports, the database pool and the parser are loaded before the baseline is read.
    warm = await post_generated(url, key, 4 * BLOCK, blake3.blake3())
    assert warm.status_code == 201, warm.text
    baseline = peak_rss(pid)

    hasher = blake3.blake3()
    response = await post_generated(url, key, SIZE, hasher)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["size_bytes"] == SIZE
    assert body["hash"] == "blake3:" + hasher.hexdigest()
    peak = peak_rss(pid)
    grown = peak - baseline
    print(f"server peak RSS {baseline / 2**20:.0f} MiB before, {peak / 2**20:.0f} MiB after a 2 GiB upload")
    assert grown < HEADROOM, f"server peak RSS grew by {grown / 1024**2:.0f} MiB during a 2 GiB upload"
    # The upload went to the store, and the spool copy is gone.
    assert (data_dir / "storage" / "tenants").exists()
    assert list((data_dir / "spool").iterdir()) == []
