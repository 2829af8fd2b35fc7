"""WebSocket clients and message routing (PROTOCOL.md section 3).

Every socket has its own outbound queue and writer task: the executor never waits on a slow client,
and the order of messages per socket is the order they were produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import struct
from typing import Any

from aiohttp import web
from PIL import Image

PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4
_FORMAT_CODES = {"JPEG": 1, "PNG": 2}
_MIME = {"JPEG": "image/jpeg", "PNG": "image/png"}


class Connection:
    def __init__(self, sid: str, ws: web.WebSocketResponse) -> None:
        self.sid = sid
        self.ws = ws
        self.feature_flags: dict[str, Any] = {}
        self._outbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop(), name=f"standin-ws-{sid}")

    def send(self, message: str | bytes) -> None:
        self._outbox.put_nowait(message)

    async def _write_loop(self) -> None:
        while (message := await self._outbox.get()) is not None:
            try:
                if isinstance(message, str):
                    await self.ws.send_str(message)
                else:
                    await self.ws.send_bytes(message)
            except (ConnectionError, RuntimeError):
                return  # the peer went away; what is still queued is lost, as on the real server

    async def stop(self) -> None:
        self._outbox.put_nowait(None)
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer


class Hub:
    def __init__(self) -> None:
        self.sockets: dict[str, Connection] = {}

    def attach(self, conn: Connection) -> None:
        # Same clientId again: the new socket takes over; the old one simply stops receiving.
        self.sockets[conn.sid] = conn

    def detach(self, conn: Connection) -> None:
        if self.sockets.get(conn.sid) is conn:
            del self.sockets[conn.sid]

    def _targets(self, sid: str | None) -> list[Connection]:
        if sid is None:
            return list(self.sockets.values())
        conn = self.sockets.get(sid)
        return [conn] if conn is not None else []

    def send(self, event: str, data: dict[str, Any], sid: str | None = None) -> None:
        """``sid=None`` broadcasts; a sid without a socket drops the message (events are not replayed)."""
        targets = self._targets(sid)
        if targets:
            text = json.dumps({"type": event, "data": data})
            for conn in targets:
                conn.send(text)

    def send_preview(self, image: Image.Image, fmt: str, metadata: dict[str, Any], sid: str | None) -> None:
        targets = self._targets(sid)
        if not targets:
            return
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {"compress_level": 1}))
        payload = buffer.getvalue()
        legacy = struct.pack(">II", PREVIEW_IMAGE, _FORMAT_CODES[fmt]) + payload
        meta = json.dumps({**metadata, "image_type": _MIME[fmt]}).encode()
        modern = struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + payload
        for conn in targets:
            # Only clients that negotiated the flag understand type 4 (transcripts 05 and 06).
            conn.send(modern if conn.feature_flags.get("supports_preview_metadata") else legacy)

    async def close_all(self) -> None:
        for conn in list(self.sockets.values()):
            with contextlib.suppress(Exception):
                await conn.ws.close()
