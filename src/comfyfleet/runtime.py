"""What a running service shares: settings, the database engine, the event bus, storage, the rate
limiter. Built once per process by ``Runtime.create`` and closed on shutdown."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.config import Settings
from comfyfleet.db.engine import SQLITE_READ_ONLY, create_engine
from comfyfleet.jobs.catalog_cache import CatalogCache
from comfyfleet.queue.bus import EventBus, create_bus
from comfyfleet.storage.base import Storage


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    bus: EventBus
    storage: Storage
    extras: dict[str, Any] = field(default_factory=dict)
    catalog_cache: CatalogCache = field(default_factory=CatalogCache)

    @classmethod
    async def create(cls, settings: Settings, *, storage: Storage | None = None) -> Runtime:
        engine = create_engine(settings.resolved_database_url)
        bus = create_bus(settings.resolved_database_url)
        await bus.start()
        if storage is None:
            from comfyfleet.storage.configured import storage_from_settings

            storage = storage_from_settings(settings)
        return cls(settings=settings, engine=engine, bus=bus, storage=storage)

    @property
    def reader(self) -> AsyncEngine:
        """The engine for reads that need no transaction: on PostgreSQL in autocommit, which saves
        the BEGIN and ROLLBACK round trips of every poll; on SQLite a deferred BEGIN, so a poll reads
        a WAL snapshot instead of taking the write lock (which stalled the workers' writes behind
        every poll, in SQLite's busy-wait steps of 1 to 100 ms). Never write through it."""
        cached: AsyncEngine | None = self.extras.get("_reader")
        if cached is None:
            if self.engine.dialect.name == "postgresql":
                cached = self.engine.execution_options(isolation_level="AUTOCOMMIT")
            else:
                cached = self.engine.execution_options(**{SQLITE_READ_ONLY: True})
            self.extras["_reader"] = cached
        return cached

    async def close(self) -> None:
        await self.bus.close()
        await self.engine.dispose()
