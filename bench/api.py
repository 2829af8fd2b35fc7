"""API throughput: job submission and job GET, 32 concurrent clients, one server process on PostgreSQL.

    .venv/bin/python -m bench.api [--seconds 10] [--concurrency 32]

Prints requests/s and p50/p99 latency per endpoint, plus what the load generator alone reaches
against the trivial /api/v2/health endpoint (if that is not far above the figures, the generator is
the bottleneck). Jobs stay queued: the service runs as `comfyfleet api` (no workers), so GET measures
the poll of a queued job including its queue position."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
from pathlib import Path

import aiohttp

from bench.common import cli, json_body, load, postgres_database, served, service_env

PLANS = {
    "bench": {
        "priority": 0,
        "max_running": 1000,
        "max_queued": 10_000_000,
        "submit_rate": "10000000/minute",
        "read_rate": "10000000/minute",
    }
}


async def main(seconds: float, concurrency: int) -> None:
    async with postgres_database() as database_url:
        with tempfile.TemporaryDirectory() as data_dir:
            env = service_env(
                database_url,
                Path(data_dir),
                COMFYFLEET_PLANS=json.dumps(PLANS),
                COMFYFLEET_AUTH_CACHE_TTL_S="5",
            )
            cli(env, "db", "upgrade")
            cli(env, "tenants", "create", "bench", "--plan", "bench")
            key = cli(env, "keys", "create", "bench")
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            async with served(env, "api") as url:
                await run(url, headers, seconds, concurrency)


async def run(url: str, headers: dict[str, str], seconds: float, concurrency: int) -> None:
    job_ids: list[str] = []

    async def health(session: aiohttp.ClientSession, _n: int) -> int:
        async with session.get(f"{url}/api/v2/health") as response:
            await response.read()
            return response.status

    async def submit(session: aiohttp.ClientSession, n: int) -> int:
        workflow = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": n % 16777215},
            },
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}},
        }
        async with session.post(
            f"{url}/api/v2/jobs", data=json_body({"workflow": workflow}), headers=headers
        ) as r:
            body = await r.json()
            if r.status == 201:
                job_ids.append(body["id"])
            return r.status

    async def get(session: aiohttp.ClientSession, _n: int) -> int:
        async with session.get(f"{url}/api/v2/jobs/{random.choice(job_ids)}", headers=headers) as response:
            await response.read()
            return response.status

    warm = await load(4, 1.0, submit)  # warm connections, caches and the planner
    del warm
    results = {
        "generator: GET /api/v2/health": await load(concurrency, seconds, health),
        "POST /api/v2/jobs": await load(concurrency, seconds, submit),
        "GET /api/v2/jobs/{id}": await load(concurrency, seconds, get),
    }
    print(
        f"comfyfleet API on PostgreSQL, {concurrency} concurrent clients, {seconds:.0f} s per endpoint "
        f"({len(job_ids)} jobs queued at the end)"
    )
    for name, result in results.items():
        print(result.line(name))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.concurrency))
