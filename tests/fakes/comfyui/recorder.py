"""A WebSocket client that records what a ComfyUI (stand-in or real) sends, in the transcripts' shape.

async with WsRecorder(url, client_id="abc") as rec:
    ... POST /prompt ...
    await rec.wait_done(prompt_id)
    rec.types(prompt_id)   # ["execution_start", "execution_cached", ...]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import aiohttp

Record = dict[str, Any]


def _binary(frame: bytes) -> dict[str, Any]:
    kind = struct.unpack(">I", frame[:4])[0]
    info: dict[str, Any] = {"len": len(frame), "event_type": kind}
    if kind == 1:
        info["event_name"] = "PREVIEW_IMAGE"
        info["image_format"] = {1: "JPEG", 2: "PNG"}.get(struct.unpack(">I", frame[4:8])[0])
        info["image"] = frame[8:]
    elif kind == 4:
        size = struct.unpack(">I", frame[4:8])[0]
        info["event_name"] = "PREVIEW_IMAGE_WITH_METADATA"
        info["metadata"] = json.loads(frame[8 : 8 + size])
        info["image"] = frame[8 + size :]
    return info


class WsRecorder:
    def __init__(self, base_url: str, client_id: str | None = None, *, feature_flags: bool = False) -> None:
        ws = base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/ws"
        self.url = f"{ws}?clientId={client_id}" if client_id else ws
        self.client_id = client_id
        self.feature_flags = feature_flags
        self.messages: list[Record] = []
        self._changed = asyncio.Condition()
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._t0 = time.monotonic()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect (again); returns once the greeting ``status`` with ``sid`` arrived."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(self.url, max_msg_size=0)
        if self.feature_flags:
            await self._ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        start = len(self.messages)
        self._reader = asyncio.create_task(self._read(self._ws))
        await self.wait_for(lambda m: m.get("type") == "status" and "sid" in m["data"], start=start)

    async def disconnect(self) -> None:
        """Close the socket but keep the record (reconnect with :meth:`open`)."""
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._ws = None

    async def close(self) -> None:
        await self.disconnect()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                record: Record = {
                    "t": time.monotonic() - self._t0,
                    "kind": "text",
                    **json.loads(message.data),
                }
            elif message.type == aiohttp.WSMsgType.BINARY:
                record = {"t": time.monotonic() - self._t0, "kind": "binary", "binary": _binary(message.data)}
            else:
                continue
            async with self._changed:
                self.messages.append(record)
                self._changed.notify_all()

    async def wait_for(
        self, predicate: Callable[[Record], bool], *, start: int = 0, timeout: float = 10.0
    ) -> Record:
        """The first text message from index ``start`` on that matches."""
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for message in self.messages[start:]:
                    if message["kind"] == "text" and predicate(message):
                        return message
                await self._changed.wait()

    async def wait_done(self, prompt_id: str, timeout: float = 10.0) -> Record:
        """The ``executing{node: null, prompt_id}`` marker: history is written by then."""
        return await self.wait_for(
            lambda m: (
                m["type"] == "executing"
                and m["data"].get("node") is None
                and m["data"].get("prompt_id") == prompt_id
            ),
            timeout=timeout,
        )

    def text(self) -> list[Record]:
        return [m for m in self.messages if m["kind"] == "text"]

    def of_prompt(self, prompt_id: str, *, binary: bool = False) -> list[Record]:
        """Messages carrying this prompt_id; with ``binary``, also the frames (which carry none) sent
        between its first and last message."""
        from .transcripts import of_prompt

        return of_prompt(self.messages, prompt_id, binary=binary)

    def types(self, prompt_id: str | None = None, *, binary: bool = False) -> list[str]:
        """Message types, ``executing:null`` for the done marker and ``BIN`` for binary frames."""
        selected = self.messages if prompt_id is None else self.of_prompt(prompt_id, binary=binary)
        out = []
        for m in selected:
            if m["kind"] == "binary":
                if binary:
                    out.append("BIN")
            elif m["type"] == "executing" and m["data"].get("node") is None:
                out.append("executing:null")
            else:
                out.append(m["type"])
        return out
