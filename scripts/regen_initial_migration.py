"""Regenerate migrations/versions/0001_initial_schema.py from comfyfleet.db.tables.

Only while no database in use depends on 0001 (before the first release); afterwards add a new
revision with `alembic revision --autogenerate` instead."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from alembic import command

from comfyfleet.db.engine import create_engine
from comfyfleet.db.migrate import MIGRATIONS, alembic_config


async def main() -> None:
    target = MIGRATIONS / "versions" / "0001_initial_schema.py"
    target.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{Path(tmp) / 'empty.db'}"
        engine = create_engine(url)
        config = alembic_config(url)

        def run(connection: object) -> None:
            config.attributes["connection"] = connection
            command.revision(config, message="initial schema", autogenerate=True, rev_id="0001")

        async with engine.connect() as conn:
            await conn.run_sync(run)
        await engine.dispose()
    print(f"wrote {target}")


if __name__ == "__main__":
    asyncio.run(main())
