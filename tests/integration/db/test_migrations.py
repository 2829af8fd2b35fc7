"""Applying the migrations gives exactly the declared schema (db/tables.py), on both databases."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from comfyfleet.db.engine import create_engine
from comfyfleet.db.tables import metadata


async def test_migrations_match_the_declared_schema(db_url: str) -> None:
    engine = create_engine(db_url)
    try:

        def diff(connection: Any) -> list[Any]:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))

        async with engine.connect() as conn:
            differences = await conn.run_sync(diff)
    finally:
        await engine.dispose()
    assert differences == []
