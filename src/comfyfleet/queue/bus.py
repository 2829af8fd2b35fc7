"""Notifications between parts of the service: new work for workers, and per-job events (status,
progress, preview, output, cancel) for SSE streams and for the worker that runs the job.

Two buses behind one interface:
- ``InProcessBus`` for the embedded default (one process: API, workers and reaper share it);
- ``PostgresBus``: ``pg_notify`` on one channel and one LISTEN connection per process, so events cross
  API processes. NOTIFY payloads are capped at 8000 bytes by PostgreSQL: bigger messages (previews)
  are delivered in-process only.
Notifications are hints. The database stays the source of truth, and every follower re-reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any, Protocol

log = logging.getLogger(__name__)

NEW_WORK = "jobs.new"
NOTIFY_CHANNEL = "comfyfleet_events"
NOTIFY_LIMIT = 7900


def job_topic(job_id: str) -> str:
    return f"job.{job_id}"


class Subscription:
    def __init__(self, bus: _LocalFanout, topic: str) -> None:
        self._bus = bus
        self.topic = topic
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)

    def deliver(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # a stalled reader loses hints, not data
            self.queue.put_nowait(message)

    async def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the item instead of raising
        # when a cancel and a message arrive together, and a loop around get() then never stops.
        try:
            async with asyncio.timeout(timeout):
                return await self.queue.get()
        except TimeoutError:
            return None

    def close(self) -> None:
        self._bus.remove(self)


class EventBus(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def publish(self, topic: str, message: dict[str, Any]) -> None: ...
    def subscribe(self, topic: str) -> contextlib.AbstractAsyncContextManager[Subscription]: ...


class _LocalFanout:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = defaultdict(set)

    def deliver(self, topic: str, message: dict[str, Any]) -> None:
        for subscription in list(self._subscribers.get(topic, ())):
            subscription.deliver(message)

    def remove(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.topic)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.topic]

    @contextlib.asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Subscription]:
        subscription = Subscription(self, topic)
        self._subscribers[topic].add(subscription)
        try:
            yield subscription
        finally:
            subscription.close()


class InProcessBus(_LocalFanout):
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def publish(self, topic: str, message: dict[str, Any]) -> None:
        self.deliver(topic, message)


class PostgresBus(_LocalFanout):
    def __init__(self, dsn: str) -> None:
        super().__init__()
        self._dsn = dsn
        self._listener: Any = None
        self._publisher: Any = None

    async def start(self) -> None:
        import asyncpg

        self._listener = await asyncpg.connect(self._dsn)
        await self._listener.add_listener(NOTIFY_CHANNEL, self._on_notify)
        # A small pool: concurrent requests publish without queueing behind one connection.
        self._publisher = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4)

    async def close(self) -> None:
        for connection in (self._listener, self._publisher):
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()
        self._listener = self._publisher = None

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            envelope = json.loads(payload)
            self.deliver(envelope["t"], envelope["m"])
        except (ValueError, KeyError):
            log.warning("ignored a malformed notification")

    async def publish(self, topic: str, message: dict[str, Any]) -> None:
        payload = json.dumps({"t": topic, "m": message}, separators=(",", ":"))
        if len(payload) > NOTIFY_LIMIT or self._publisher is None:
            self.deliver(topic, message)
            return
        try:
            await self._publisher.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, payload)
        except Exception:  # the bus is a hint; a lost notification is covered by polling
            log.exception("pg_notify failed; delivering in-process only")
            self.deliver(topic, message)


_announcing: set[asyncio.Task[None]] = set()


def announce(bus: EventBus, topic: str, message: dict[str, Any]) -> None:
    """Publish without waiting for it. For the worker's hints (a status, progress or output that
    followers re-read from the database), so a job does not sit out a NOTIFY round trip on
    PostgreSQL at every step; the order of two announcements is not guaranteed."""
    task = asyncio.create_task(bus.publish(topic, message))
    _announcing.add(task)
    task.add_done_callback(_announcing.discard)


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def create_bus(database_url: str) -> EventBus:
    from comfyfleet.db.engine import is_sqlite

    if is_sqlite(database_url):
        return InProcessBus()
    return PostgresBus(asyncpg_dsn(database_url))
