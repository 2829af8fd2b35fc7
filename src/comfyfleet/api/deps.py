"""Request-scoped helpers shared by the routers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.errors import PayloadTooLarge, ValidationFailed
from comfyfleet.runtime import Runtime

AfterCommit = Callable[[], Awaitable[None]]


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


class UnitOfWork:
    """One transaction per request: committed once at the end, or rolled back on error. Work that must
    only happen after the commit (notifications) is queued with ``after_commit``. The transaction
    begins with the first statement, so checks before it (DNS of a webhook URL) hold no lock."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self._after: list[AfterCommit] = []

    def after_commit(self, action: AfterCommit) -> None:
        self._after.append(action)

    async def run_after_commit(self) -> None:
        for action in self._after:
            await action()


async def unit_of_work(request: Request) -> AsyncIterator[UnitOfWork]:
    runtime = get_runtime(request)
    async with runtime.engine.connect() as conn:
        uow = UnitOfWork(conn)
        try:
            yield uow
        except BaseException:
            await conn.rollback()
            raise
        await conn.commit()
    await uow.run_after_commit()


async def read_connection(request: Request) -> AsyncIterator[AsyncConnection]:
    """A connection for reads only: GET never writes."""
    async with get_runtime(request).reader.connect() as conn:
        yield conn


# scope="function": the commit runs before the response is sent. With FastAPI's default scope the
# client could hold a 201 or a "canceling" for a transaction that is not committed yet (a GET right
# after the submit then answered 404 on PostgreSQL), and the read connection would stay checked out
# while the response streams.
Uow = Annotated[UnitOfWork, Depends(unit_of_work, scope="function")]
ReadConn = Annotated[AsyncConnection, Depends(read_connection, scope="function")]


def base_url(request: Request) -> str:
    configured = get_runtime(request).settings.public_base_url
    if configured:
        return configured.rstrip("/")
    return str(request.base_url).rstrip("/")


async def read_json(request: Request, max_bytes: int) -> tuple[Any, bytes]:
    """The body as JSON, capped: 413 beyond ``max_bytes``, 422 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"The request body exceeds {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"The request body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        return None, raw
    try:
        return orjson.loads(raw), raw
    except orjson.JSONDecodeError as exc:
        raise ValidationFailed(f"The request body is not valid JSON: {exc}", code="invalid_request") from exc
