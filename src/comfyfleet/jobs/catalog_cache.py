"""The node catalog the workers published, cached in the API process. ComfyUI's /object_info is
megabytes of JSON; submissions must not parse it each time. A cheap timestamp read every
``check_s`` tells whether a newer catalog was published."""

from __future__ import annotations

import time
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.jobs import repository as repo
from comfyfleet.worker.comfy.catalog import NodeCatalog


class CatalogCache:
    def __init__(self, check_s: float = 5.0) -> None:
        self.check_s = check_s
        self._catalog: NodeCatalog | None = None
        self._version: datetime | None = None
        self._checked = float("-inf")

    async def get(self, conn: AsyncConnection) -> NodeCatalog | None:
        now = time.monotonic()
        if now - self._checked < self.check_s:
            return self._catalog
        self._checked = now
        version = await repo.latest_catalog_time(conn)
        if version != self._version:
            object_info = await repo.latest_catalog(conn) if version is not None else None
            self._catalog = NodeCatalog(object_info) if object_info else None
            self._version = version
        return self._catalog

    def invalidate(self) -> None:
        self._checked = float("-inf")
