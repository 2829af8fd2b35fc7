"""Async client for one ComfyUI 0.8.0 process (one GPU slot), built on the recorded protocol
(shared/comfyui/PROTOCOL.md).

One client per slot, with a fixed ``client_id``: ComfyUI routes a prompt's events only to the
socket whose clientId submitted it, and a second socket with the same clientId replaces the first.
The client keeps one WebSocket open in a background task and hands each prompt's events to a
queue of its own, so a caller connects once and then submits and follows prompts one after
another::

    async with ComfyClient("http://127.0.0.1:8188", client_id=slot_id) as comfy:
        await comfy.submit(graph, prompt_id=job_id)   # subscribes *before* POST /prompt
        async for event in comfy.follow(job_id):
            ...                                        # ends with exactly one Done

Events sent while the socket is down are lost for good (transcript 12). After a reconnect, and
whenever a followed prompt stays silent for ``stall_timeout``, the client asks ``/history/{id}``
and ``/api/jobs/{id}`` and, if the prompt finished, rebuilds its outcome from there
(``Done.recovered``). Only ``Done`` is guaranteed; other events may be missing after a drop.

Errors::

    ComfyfleetError
     └── ComfyError                 an answer ComfyUI should not have given
          ├── ComfyUnavailable      connection refused/reset, timeout, 5xx: try again later
          ├── ComfyValidationError  400 from POST /prompt: ``error`` + ``node_errors``
          └── ComfyNotFound         /view has no such file
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

import aiohttp
import httpx

from comfyfleet.errors import ComfyfleetError

from .events import (
    ComfyEvent,
    Done,
    Executed,
    Executing,
    Failed,
    Interrupted,
    Lost,
    Preview,
    Started,
    Succeeded,
    TerminalEvent,
    event_from_message,
    outcome_of,
    parse_preview_frame,
    terminal_from_history,
)

logger = logging.getLogger(__name__)

JSON = dict[str, Any]
CancelResult = Literal["dequeued", "interrupt_sent", "finished", "not_found"]
_RECONNECT_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


class ComfyError(ComfyfleetError):
    status_code = 502
    code = "comfy_error"


class ComfyUnavailable(ComfyError):
    status_code = 503
    code = "retryable"


class ComfyValidationError(ComfyError):
    """ComfyUI rejected the prompt (nothing was queued). ``error["type"]`` is one of invalid_prompt,
    prompt_no_outputs, no_prompt, prompt_outputs_failed_validation."""

    status_code = 422
    code = "invalid_workflow"

    def __init__(self, error: JSON, node_errors: JSON) -> None:
        message = str(error.get("message") or "prompt rejected by ComfyUI")
        super().__init__(message, details={"error": error, "node_errors": node_errors})
        self.error = error
        self.node_errors = node_errors

    @property
    def error_type(self) -> str:
        return str(self.error.get("type", ""))


class ComfyNotFound(ComfyError):
    status_code = 404
    code = "not_found"


@dataclass(frozen=True, slots=True)
class SubmitResult:
    prompt_id: str
    number: float
    # Non-empty when some output nodes failed validation but at least one is valid: only the
    # valid outputs run.
    node_errors: JSON = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueueEntry:
    number: float
    prompt_id: str
    client_id: str | None


@dataclass(frozen=True, slots=True)
class QueueState:
    running: tuple[QueueEntry, ...]
    pending: tuple[QueueEntry, ...]  # in execution order (the server sends a raw heap)


@dataclass
class _Subscription:
    prompt_id: str
    events: asyncio.Queue[ComfyEvent | None] = field(default_factory=asyncio.Queue)  # None: client closed
    outputs: dict[str, Any] = field(default_factory=dict)
    terminal: TerminalEvent | None = None
    done: bool = False
    last_node: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def settled(self) -> bool:
        # A method, not the attribute: it must be re-read after every await.
        return self.done


def _queue_entries(rows: Any) -> tuple[QueueEntry, ...]:
    entries = []
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, list) and len(row) >= 4:
            extra = row[3] if isinstance(row[3], dict) else {}
            client_id = extra.get("client_id")
            entries.append(
                QueueEntry(float(row[0]), str(row[1]), None if client_id is None else str(client_id))
            )
    return tuple(entries)


class ComfyClient:
    def __init__(
        self,
        base_url: str,
        *,
        client_id: str | None = None,
        timeout: float = 30.0,
        health_timeout: float = 2.0,
        stall_timeout: float = 15.0,
        reconnect_delays: tuple[float, ...] = _RECONNECT_DELAYS,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.server_features: JSON = {}
        self._timeout = timeout
        self._health_timeout = health_timeout
        self._stall_timeout = stall_timeout
        self._reconnect_delays = reconnect_delays or _RECONNECT_DELAYS
        # httpx sends no Origin header; ComfyUI answers 403 to a loopback Host with a foreign Origin.
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)
        scheme, rest = self.base_url.split("://", 1)
        self._ws_url = f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={quote(self.client_id)}"
        self._ws_session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._connections = 0
        self._last_ws_error: BaseException | None = None
        self._subs: dict[str, _Subscription] = {}
        self._running: str | None = None  # our prompt that ComfyUI runs now, for messages without an id
        self._tasks: set[asyncio.Task[Any]] = set()
        self._object_info: JSON | None = None
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        tasks = [t for t in (self._reader, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._ws is not None:
            await self._ws.close()
        if self._ws_session is not None:
            await self._ws_session.close()
        await self._http.aclose()
        for sub in self._subs.values():
            sub.events.put_nowait(None)

    # --- HTTP --------------------------------------------------------------------------------------

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ComfyUnavailable(f"{method} {path}: {exc!r}") from exc
        if response.status_code >= 500:
            raise ComfyUnavailable(f"{method} {path} answered {response.status_code}: {response.text[:200]}")
        return response

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise ComfyError(f"{response.request.url.path}: not JSON ({response.text[:200]!r})") from exc

    async def _get_json(self, path: str, **kwargs: Any) -> Any:
        response = await self._request("GET", path, **kwargs)
        if response.status_code != 200:
            raise ComfyError(f"GET {path} answered {response.status_code}")
        return self._json(response)

    async def _get_object(self, path: str, **kwargs: Any) -> JSON:
        data = await self._get_json(path, **kwargs)
        if not isinstance(data, dict):
            raise ComfyError(f"GET {path}: expected an object")
        return data

    async def health(self, timeout: float | None = None) -> bool:
        """True when /system_stats answers 200 within a short timeout."""
        try:
            response = await self._http.get("/system_stats", timeout=timeout or self._health_timeout)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def system_stats(self) -> JSON:
        return await self._get_object("/system_stats")

    async def features(self) -> JSON:
        return await self._get_object("/features")

    async def object_info(self, node_class: str | None = None, *, refresh: bool = False) -> JSON:
        """All node schemas (cached after the first call), or ``{class: schema}`` for one class
        (``{}`` when ComfyUI has no such class)."""
        if self._object_info is None or refresh:
            self._object_info = await self._get_object("/object_info")
        if node_class is None:
            return self._object_info
        if node_class in self._object_info:
            return {node_class: self._object_info[node_class]}
        return await self._get_object(f"/object_info/{quote(node_class, safe='')}")

    async def history(self, prompt_id: str) -> JSON | None:
        """The history entry of a finished prompt; None while pending or running, or when unknown."""
        data = await self._get_object(f"/history/{quote(prompt_id, safe='')}")
        entry = data.get(prompt_id)
        return entry if isinstance(entry, dict) else None

    async def job(self, prompt_id: str) -> JSON | None:
        """``/api/jobs/{id}``: status pending|in_progress|completed|failed; None when unknown."""
        response = await self._request("GET", f"/api/jobs/{quote(prompt_id, safe='')}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ComfyError(f"GET /api/jobs/{prompt_id} answered {response.status_code}")
        data = self._json(response)
        return data if isinstance(data, dict) else None

    async def queue(self) -> QueueState:
        data = await self._get_object("/queue")
        pending = sorted(_queue_entries(data.get("queue_pending")), key=lambda e: (e.number, e.prompt_id))
        return QueueState(running=_queue_entries(data.get("queue_running")), pending=tuple(pending))

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt ``prompt_id`` if it is running now; a no-op otherwise (also for pending ones).
        ComfyUI answers 200 either way: confirm through the terminal event or :meth:`job`."""
        await self._expect_200("POST", "/interrupt", json={"prompt_id": prompt_id})

    async def interrupt_all(self) -> None:
        """Interrupt whatever runs, whoever submitted it. Pending prompts are not touched."""
        await self._expect_200("POST", "/interrupt")

    async def delete_queued(self, prompt_id: str) -> None:
        """Take a pending prompt out of the queue; silently does nothing if it runs or is unknown.
        A followed prompt that is gone afterwards ends with ``Lost`` (it never reaches history)."""
        await self._expect_200("POST", "/queue", json={"delete": [prompt_id]})
        sub = self._subs.get(prompt_id)
        if sub is not None and not sub.done:
            await self._reconcile(sub)

    async def _expect_200(self, method: str, path: str, **kwargs: Any) -> None:
        response = await self._request(method, path, **kwargs)
        if response.status_code != 200:
            raise ComfyError(f"{method} {path} answered {response.status_code}")

    async def cancel(self, prompt_id: str) -> CancelResult:
        """The recommended cancel (PROTOCOL.md section 4): dequeue, and interrupt if it already runs."""
        job = await self.job(prompt_id)
        if job is None:
            return "not_found"
        for _ in range(3):
            if job.get("status") in ("completed", "failed"):
                return "finished"
            if job.get("status") == "in_progress":
                await self.interrupt(prompt_id)
                return "interrupt_sent"
            await self.delete_queued(prompt_id)
            job = await self.job(prompt_id)
            if job is None:
                return "dequeued"
        return "interrupt_sent" if job.get("status") == "in_progress" else "finished"

    async def upload_input(
        self,
        source: bytes | str | os.PathLike[str],
        *,
        name: str,
        subfolder: str = "",
        overwrite: bool = False,
    ) -> str:
        """Upload to ComfyUI's input folder; returns the name to put in LoadImage (``subfolder/name``).

        Without ``overwrite`` ComfyUI keeps identical bytes under the same name and renames
        different bytes to ``name (1).ext``: always use the returned name.
        """
        form = {"type": "input", "subfolder": subfolder, "overwrite": "true" if overwrite else "false"}
        # Inputs are bounded by ComfyUI's upload cap (100 MB), so reading them whole is fine.
        content = source if isinstance(source, bytes) else await asyncio.to_thread(Path(source).read_bytes)
        response = await self._request("POST", "/upload/image", data=form, files={"image": (name, content)})
        if response.status_code != 200:
            raise ComfyError(f"POST /upload/image answered {response.status_code}")
        data = self._json(response)
        stored, folder = str(data["name"]), str(data.get("subfolder") or "")
        return f"{folder}/{stored}" if folder else stored

    async def download_output(
        self, filename: str, subfolder: str, type: str, dest_path: str | os.PathLike[str]
    ) -> int:
        """Stream a file from ``/view`` to ``dest_path`` (written whole or not at all); returns its size."""
        dest = Path(dest_path)
        partial = dest.with_name(dest.name + ".part")
        params = {"filename": filename, "subfolder": subfolder, "type": type}
        size = 0
        try:
            async with self._http.stream("GET", "/view", params=params) as response:
                if response.status_code == 404:
                    raise ComfyNotFound(f"no {type} file {subfolder}/{filename}")
                if response.status_code >= 500:
                    raise ComfyUnavailable(f"GET /view answered {response.status_code}")
                if response.status_code != 200:
                    raise ComfyError(f"GET /view answered {response.status_code}")
                # Plain file writes: chunks are small and local disks fast enough for this loop.
                with partial.open("wb") as handle:
                    async for chunk in response.aiter_bytes():
                        handle.write(chunk)
                        size += len(chunk)
            partial.replace(dest)
        except httpx.TransportError as exc:
            raise ComfyUnavailable(f"GET /view: {exc!r}") from exc
        finally:
            partial.unlink(missing_ok=True)
        return size

    # --- prompts -----------------------------------------------------------------------------------

    async def submit(
        self,
        prompt: Mapping[str, Any],
        *,
        prompt_id: str,
        extra_data: Mapping[str, Any] | None = None,
        front: bool = False,
    ) -> SubmitResult:
        """Queue ``prompt`` under ``prompt_id`` (ComfyUI accepts any string and does not reject
        duplicates). The socket is connected and the prompt subscribed before the POST, so no event
        is missed. After ComfyUnavailable the prompt may or may not be queued: check :meth:`job`
        before submitting the same id again."""
        await self.connect()
        existing = self._subs.get(prompt_id)
        if existing is not None and not existing.done:
            raise ValueError(f"prompt {prompt_id} is already being followed")
        sub = self._subs[prompt_id] = _Subscription(prompt_id)
        body: JSON = {"prompt": dict(prompt), "client_id": self.client_id, "prompt_id": prompt_id}
        if extra_data:
            body["extra_data"] = dict(extra_data)
        if front:
            body["front"] = True
        try:
            response = await self._request("POST", "/prompt", json=body)
            data = self._json(response)
            if response.status_code == 400 and isinstance(data, dict):
                error = data.get("error")
                raise ComfyValidationError(
                    error if isinstance(error, dict) else {"message": str(error)},
                    data.get("node_errors") or {},
                )
            if response.status_code != 200 or not isinstance(data, dict):
                raise ComfyError(f"POST /prompt answered {response.status_code}: {response.text[:200]}")
        except BaseException:
            if self._subs.get(prompt_id) is sub:
                del self._subs[prompt_id]
            raise
        return SubmitResult(
            str(data.get("prompt_id", prompt_id)), float(data.get("number", 0)), data.get("node_errors") or {}
        )

    async def follow(self, prompt_id: str) -> AsyncIterator[ComfyEvent]:
        """Events of one prompt until (and including) its ``Done``.

        Works for prompts submitted by this client and, through history, for ones submitted before
        (e.g. by a previous worker process with the same client_id). Raises ComfyUnavailable when
        ComfyUI cannot be reached to settle the outcome; calling ``follow`` again resumes.
        """
        sub = self._subs.get(prompt_id)
        if sub is None:
            sub = self._subs[prompt_id] = _Subscription(prompt_id)
            await self.connect()
            await self._reconcile(sub)  # it may be long finished
        while True:
            try:
                async with asyncio.timeout(self._stall_timeout):
                    event = await sub.events.get()
            except TimeoutError:
                # Silence: the socket may be half-dead or the events lost. Ask over HTTP.
                await self._reconcile(sub)
                continue
            if event is None:
                raise ComfyUnavailable("the ComfyClient was closed")
            yield event
            if isinstance(event, Done):
                if self._subs.get(prompt_id) is sub:
                    del self._subs[prompt_id]
                return

    def abandon(self, reason: str) -> None:
        """End every followed prompt now with ``Lost`` (and its ``Done``): for a caller that knows
        this ComfyUI is gone (its process died), which would otherwise learn it only from the
        reconnect or the stall timer, after the process is back or seconds later."""
        for sub in list(self._subs.values()):
            if not sub.done:
                self._deliver(sub, Lost(sub.prompt_id, reason))
                self._finish(sub, sub.outputs, recovered=True)

    def forget(self, prompt_id: str) -> None:
        """Stop buffering events of a prompt nobody will follow."""
        self._subs.pop(prompt_id, None)

    # --- WebSocket ---------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    async def connect(self, timeout: float | None = None) -> None:
        """Open the WebSocket (once; it reconnects by itself) and wait for ComfyUI's greeting."""
        if self._closed:
            raise ComfyUnavailable("the ComfyClient was closed")
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_forever(), name=f"comfy-ws-{self.client_id}")
        try:
            async with asyncio.timeout(timeout or self._timeout):
                await self._ready.wait()
        except TimeoutError:
            raise ComfyUnavailable(f"no WebSocket to {self._ws_url}: {self._last_ws_error!r}") from None

    async def reconnect(self) -> None:
        """Drop the socket; the reader opens a new one with the same clientId and reconciles."""
        if self._ws is not None:
            await self._ws.close()

    async def _open_ws(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws_session is None:
            self._ws_session = aiohttp.ClientSession()
        ws = await self._ws_session.ws_connect(self._ws_url, heartbeat=30.0, max_msg_size=0)
        try:
            # Must be the first message: previews then carry prompt_id and node_id (type 4 frames).
            await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        except BaseException:
            await ws.close()
            raise
        return ws

    async def _read_forever(self) -> None:
        attempt = 0
        while not self._closed:
            try:
                ws = await self._open_ws()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self._last_ws_error = exc
            else:
                self._ws = ws
                try:
                    await self._pump(ws)
                except (aiohttp.ClientError, OSError) as exc:
                    self._last_ws_error = exc
                finally:
                    if self._ready.is_set():
                        attempt = 0  # it worked for a while: start backing off afresh
                    self._ready.clear()
                    self._ws = None
                    with contextlib.suppress(Exception):
                        await ws.close()
                logger.info("ComfyUI WebSocket %s closed; reconnecting", self._ws_url)
            await asyncio.sleep(self._reconnect_delays[min(attempt, len(self._reconnect_delays) - 1)])
            attempt += 1

    async def _pump(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type == aiohttp.WSMsgType.ERROR:
                return
            try:
                if message.type == aiohttp.WSMsgType.TEXT:
                    self._on_text(message.data)
                elif message.type == aiohttp.WSMsgType.BINARY:
                    self._on_binary(message.data)
            except Exception:
                # One odd message must not kill the reader (and with it every follow()).
                logger.exception("could not handle a ComfyUI message")

    def _on_text(self, raw: str) -> None:
        try:
            message = json.loads(raw)
        except json.JSONDecodeError:
            logger.warning("ComfyUI sent invalid JSON: %.200s", raw)
            return
        if not isinstance(message, dict):
            return
        kind = str(message.get("type"))
        data = message.get("data")
        data = data if isinstance(data, dict) else {}
        if kind == "status":
            if "sid" in data:  # the greeting: this socket is registered server-side from now on
                self._on_greeting()
            return
        if kind == "feature_flags":
            self.server_features = data
            return
        prompt_id = data.get("prompt_id")
        if kind == "executing" and data.get("node") is None:
            sub = self._subs.get(str(prompt_id))
            if sub is not None:
                self._on_done_marker(sub)
            return
        if prompt_id is None and kind == "executing":
            prompt_id = self._running  # the greeting after a reconnect names the node only
        sub = self._subs.get(str(prompt_id)) if prompt_id is not None else None
        if sub is None:
            return
        event = event_from_message(kind, data, sub.prompt_id)
        if event is not None:
            self._deliver(sub, event)

    def _on_binary(self, frame: bytes) -> None:
        preview = parse_preview_frame(frame)
        if preview is None:
            return
        prompt_id = preview.prompt_id or self._running
        sub = self._subs.get(prompt_id) if prompt_id is not None else None
        if sub is not None:
            node_id = preview.node_id or sub.last_node
            self._deliver(sub, Preview(sub.prompt_id, node_id, preview.image, preview.format))

    def _on_greeting(self) -> None:
        self._connections += 1
        self._ready.set()
        if self._connections > 1:
            # Whatever happened while we were away is lost on the wire: settle it over HTTP.
            for sub in list(self._subs.values()):
                if not sub.done:
                    self._spawn(self._reconcile_quietly(sub))

    def _deliver(self, sub: _Subscription, event: ComfyEvent) -> None:
        if sub.done:
            return
        if isinstance(event, Started):
            self._running = sub.prompt_id
        elif isinstance(event, Executing):
            sub.last_node = event.node
        elif isinstance(event, Executed):
            sub.outputs[event.node] = dict(event.output)
        elif isinstance(event, Succeeded | Failed | Interrupted | Lost):
            if sub.terminal is not None:
                return
            sub.terminal = event
            if self._running == sub.prompt_id:
                self._running = None
        sub.events.put_nowait(event)

    def _on_done_marker(self, sub: _Subscription) -> None:
        if sub.done:
            return
        if sub.terminal is None:
            # History is written before the marker, so the lost terminal event is there.
            self._spawn(self._reconcile_quietly(sub))
        else:
            self._finish(sub, sub.outputs, recovered=False)

    def _finish(self, sub: _Subscription, outputs: Mapping[str, Any], *, recovered: bool) -> None:
        assert sub.terminal is not None
        if sub.done:
            return  # exactly one Done per prompt, whichever path settles it first
        sub.done = True
        sub.events.put_nowait(Done(sub.prompt_id, outcome_of(sub.terminal), dict(outputs), recovered))

    async def _reconcile(self, sub: _Subscription) -> None:
        """Settle a prompt from /history (finished) or /api/jobs (404: the server lost it)."""
        async with sub.lock:
            for _ in range(2):
                if sub.settled():
                    return
                entry = await self.history(sub.prompt_id)
                if sub.settled():  # the socket settled it while we waited
                    return
                if entry is not None:
                    outputs = entry.get("outputs")
                    outputs = outputs if isinstance(outputs, dict) else {}
                    for node_id, ui in outputs.items():
                        if node_id not in sub.outputs and isinstance(ui, dict):
                            self._deliver(sub, Executed(sub.prompt_id, str(node_id), ui))
                    self._deliver(sub, terminal_from_history(sub.prompt_id, entry))
                    self._finish(sub, outputs, recovered=True)
                    return
                job = await self.job(sub.prompt_id)
                if sub.settled():
                    return
                if job is None:
                    reason = "unknown to ComfyUI: deleted from the queue, or ComfyUI restarted"
                    self._deliver(sub, Lost(sub.prompt_id, reason))
                    self._finish(sub, sub.outputs, recovered=True)
                    return
                if job.get("status") in ("pending", "in_progress"):
                    return  # still to come over the socket
                # finished between the two reads: read history again

    async def _reconcile_quietly(self, sub: _Subscription) -> None:
        try:
            await self._reconcile(sub)
        except ComfyError as exc:
            # follow() retries on its stall timer; nothing is lost by waiting.
            logger.warning("could not reconcile prompt %s: %s", sub.prompt_id, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
