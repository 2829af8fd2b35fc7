"""Shared pieces of the benchmarks: a throwaway PostgreSQL database, a served comfyfleet process,
a tenant with a key, and an aiohttp load loop that reports rate and latency percentiles."""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
SECRETS = {
    "COMFYFLEET_KEY_PEPPER": "bench-pepper-0123456789abcdef012345",
    "COMFYFLEET_URL_SIGNING_KEY": "bench-signing-0123456789abcdef01234",
    "COMFYFLEET_WEBHOOK_ENCRYPTION_KEY": "bench-webhook-0123456789abcdef0123",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    name = f"comfyfleet_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(PG_ADMIN)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        conn = await asyncpg.connect(PG_ADMIN)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


def service_env(database_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        **SECRETS,
        "COMFYFLEET_ENV": "test",
        "COMFYFLEET_DATABASE_URL": database_url,
        "COMFYFLEET_DATA_DIR": str(data_dir),
        "COMFYFLEET_LOG_LEVEL": "WARNING",
    }
    env.update(extra)
    return env


def cli(env: dict[str, str], *args: str) -> str:
    exe = Path(sys.executable).parent / "comfyfleet"
    return subprocess.run(
        [str(exe), *args], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


@asynccontextmanager
async def served(env: dict[str, str], command: str = "serve") -> AsyncIterator[str]:
    port = free_port()
    exe = Path(sys.executable).parent / "comfyfleet"
    process = subprocess.Popen([str(exe), command, "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"{url}/api/v2/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("the service did not start")
        yield url
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies_ms: list[float]
    errors: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("nan")

    def line(self, name: str) -> str:
        return (
            f"{name:<28} {self.rate:8.0f} req/s   p50 {statistics.median(self.latencies_ms):6.2f} ms   "
            f"p99 {self.percentile(0.99):6.2f} ms   errors {self.errors}"
        )


async def load(
    concurrency: int,
    seconds: float,
    request: Callable[[aiohttp.ClientSession, int], Awaitable[int]],
) -> LoadResult:
    """``concurrency`` loops issue ``request`` back to back for ``seconds``."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)

    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(index: int) -> None:
            nonlocal errors
            counter = 0
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                status = await request(session, index * 1_000_000 + counter)
                latencies.append((time.perf_counter() - start) * 1000)
                counter += 1
                if status >= 400:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    return LoadResult(len(latencies), elapsed, latencies, errors)


def json_body(data: Any) -> bytes:
    import orjson

    return orjson.dumps(data)
