"""Test databases: a migrated SQLite file per test, and one PostgreSQL database per test session
(tables truncated between tests)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import asyncpg
from sqlalchemy import text

from comfyfleet.db.engine import create_engine
from comfyfleet.db.migrate import upgrade
from comfyfleet.db.tables import metadata
from tests.support.services import PG_HOST, PG_PORT

ADMIN_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"


async def create_pg_database() -> tuple[str, str]:
    name = f"comfyfleet_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/{name}"
    await upgrade(url)
    return name, url


async def drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def truncate_all(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            names = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
            await conn.execute(text(f"TRUNCATE {names} CASCADE"))
            await conn.execute(text('DELETE FROM "alembic_version" WHERE false'))
    finally:
        await engine.dispose()


_template: Path | None = None


async def sqlite_database(directory: Path) -> str:
    """A migrated SQLite file: migrations run once per session, then the file is copied."""
    global _template
    if _template is None or not _template.exists():
        template_dir = (
            Path(os.environ.get("PYTEST_TMP_TEMPLATE", "/tmp")) / f"cf-sqlite-template-{os.getpid()}"
        )
        template_dir.mkdir(parents=True, exist_ok=True)
        candidate = template_dir / "template.db"
        candidate.unlink(missing_ok=True)
        await upgrade(f"sqlite+aiosqlite:///{candidate}")
        _template = candidate
    target = directory / "comfyfleet.db"
    shutil.copyfile(_template, target)
    return f"sqlite+aiosqlite:///{target}"
