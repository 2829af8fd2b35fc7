"""HTTP and WebSocket routes of ComfyUI 0.8.0 (server.py), plus the test-only ``/__standin/`` routes."""

from __future__ import annotations

import hashlib
import io
import json
import mimetypes
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from ipaddress import ip_address
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web
from PIL import Image

from .control import DeleteRecord, InterruptRecord, PromptRecord
from .files import inside, split_annotation
from .hub import Connection
from .jobs import JobsQueryError, get_job, list_jobs
from .nodes import NODES
from .prompt_queue import QueueItem
from .validation import validate_prompt

if TYPE_CHECKING:
    from .server import Standin

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_UPLOAD_SIZE = 100 * 1024 * 1024
FEATURES = {
    "supports_preview_metadata": True,
    "max_upload_size": MAX_UPLOAD_SIZE,
    "extension": {"manager": {"supports_v4": True}},
}
_SENSITIVE = ("auth_token_comfy_org", "api_key_comfy_org")
_MODEL_FOLDERS = [
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "embeddings",
    "upscale_models",
]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@web.middleware
async def origin_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """403 when a loopback Host meets a different Origin (browser CSRF guard, server.py:141)."""
    host = request.headers.get("Host", "")
    origin = request.headers.get("Origin")
    if host and origin:
        host_name = urlsplit(f"//{host}").hostname or ""
        if _is_loopback(host_name) and urlsplit(origin).netloc.lower() != host.lower():
            return web.Response(status=403)
    return await handler(request)


async def _json_body(request: web.Request) -> Any:
    """The body as JSON, or {} when empty/invalid (the routes that tolerate that)."""
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


class Routes:
    def __init__(self, standin: Standin) -> None:
        self.s = standin
        self._number = 0

    def table(self) -> list[tuple[str, str, Handler]]:
        comfy: list[tuple[str, str, Handler]] = [
            ("GET", "/ws", self.websocket),
            ("POST", "/prompt", self.post_prompt),
            ("GET", "/prompt", self.get_prompt),
            ("GET", "/queue", self.get_queue),
            ("POST", "/queue", self.post_queue),
            ("POST", "/interrupt", self.post_interrupt),
            ("GET", "/history", self.get_history),
            ("GET", "/history/{prompt_id}", self.get_history_item),
            ("POST", "/history", self.post_history),
            ("GET", "/api/jobs", self.get_jobs),  # declared with /api, so /api/api/jobs exists too
            ("GET", "/api/jobs/{job_id}", self.get_job),
            ("GET", "/view", self.view),
            ("POST", "/upload/image", self.upload_image),
            ("GET", "/object_info", self.object_info),
            ("GET", "/object_info/{node_class}", self.object_info_one),
            ("GET", "/system_stats", self.system_stats),
            ("GET", "/features", self.features),
            ("POST", "/free", self.free),
            ("GET", "/models", self.models),
            ("GET", "/models/{folder}", self.models_folder),
            ("GET", "/embeddings", self.embeddings),
        ]
        table = comfy + [(method, "/api" + path, handler) for method, path, handler in comfy]
        table += [
            ("GET", "/__standin/log", self.standin_log),
            ("POST", "/__standin/log/clear", self.standin_log_clear),
            ("GET", "/__standin/config", self.standin_config),
            ("POST", "/__standin/config", self.standin_config),
            ("POST", "/__standin/release", self.standin_release),
            ("POST", "/__standin/drop_ws", self.standin_drop_ws),
        ]
        return table

    # --- WebSocket ---------------------------------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        conn = Connection(sid, ws)
        self.s.hub.attach(conn)
        try:
            conn.send(json.dumps({"type": "status", "data": {"status": self.s.exec_info(), "sid": sid}}))
            executor = self.s.executor
            if executor.client_id == sid and executor.last_node_id is not None:
                # The owner of the running prompt is told where it is, without a prompt_id (server.py:265).
                conn.send(json.dumps({"type": "executing", "data": {"node": executor.last_node_id}}))
            first = True
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except json.JSONDecodeError:
                    continue
                if first and isinstance(data, dict) and data.get("type") == "feature_flags":
                    conn.feature_flags = dict(data.get("data") or {})
                    conn.send(json.dumps({"type": "feature_flags", "data": FEATURES}))
                first = False
        finally:
            self.s.hub.detach(conn)
            await conn.stop()
        return ws

    # --- prompts and queue -------------------------------------------------------------------------

    async def post_prompt(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            # aiohttp's own answer to the exception ComfyUI lets escape here (transcript 03 h).
            return web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")
        if not isinstance(body, dict):
            body = {}
        # The counter moves for every parsed POST, rejected ones included; an explicit number does not.
        if "number" in body:
            number: float | int = float(body["number"])
        else:
            number = -self._number if body.get("front") else self._number
            self._number += 1
        client_id = body.get("client_id")
        if "prompt" not in body:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            self.s.log.prompts.append(PromptRecord(None, number, client_id, False, "no_prompt"))
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        result = validate_prompt(prompt, self.s.dirs, body.get("partial_execution_targets"))
        if not result.ok:
            error_type = (result.error or {}).get("type")
            self.s.log.prompts.append(PromptRecord(prompt_id, number, client_id, False, error_type))
            return web.json_response({"error": result.error, "node_errors": result.node_errors}, status=400)
        extra_data = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra_data["client_id"] = client_id
        extra_data["create_time"] = self.s.now_ms()
        sensitive = {key: extra_data.pop(key) for key in _SENSITIVE if key in extra_data}
        self.s.queue.put(QueueItem(number, prompt_id, prompt, extra_data, result.outputs, sensitive))
        self.s.log.prompts.append(PromptRecord(prompt_id, number, client_id, True, None))
        return web.json_response(
            {"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors}
        )

    async def get_prompt(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.s.exec_info())

    async def get_queue(self, request: web.Request) -> web.StreamResponse:
        queue = self.s.queue
        return web.json_response(
            {
                "queue_running": [item.wire() for item in queue.running.values()],
                "queue_pending": [item.wire() for item in queue.pending],
            }
        )

    async def post_queue(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        if isinstance(body, dict):
            if body.get("clear"):
                self.s.queue.wipe()
            for prompt_id in body.get("delete", []) or []:
                removed = self.s.queue.delete(str(prompt_id))
                self.s.log.deletes.append(DeleteRecord(str(prompt_id), removed))
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        wanted = body.get("prompt_id") if isinstance(body, dict) else None
        running = self.s.queue.running_ids()
        # Targeted: only if that prompt is running right now; global: whatever runs (section 4).
        matches = wanted is None or wanted in running
        record = InterruptRecord(wanted, running[0] if running else None, flag_set=matches)
        self.s.log.interrupts.append(record)
        if matches:
            self.s.executor.interrupt(record)
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.StreamResponse:
        history = self.s.queue.history
        if "max_items" not in request.query:
            return web.json_response(history)
        max_items = int(request.query["max_items"])
        offset = int(request.query.get("offset", -1))
        if offset < 0:
            offset = len(history) - max_items  # max_items alone returns the *last* N
        keys = list(history)[max(offset, 0) :][:max_items]
        return web.json_response({key: history[key] for key in keys})

    async def get_history_item(self, request: web.Request) -> web.StreamResponse:
        prompt_id = request.match_info["prompt_id"]
        entry = self.s.queue.history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def post_history(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        if isinstance(body, dict):
            if body.get("clear"):
                self.s.queue.history.clear()
            for prompt_id in body.get("delete", []) or []:
                self.s.queue.history.pop(str(prompt_id), None)
        return web.Response(status=200)

    async def get_jobs(self, request: web.Request) -> web.StreamResponse:
        try:
            return web.json_response(list_jobs(self.s.queue, dict(request.query)))
        except JobsQueryError as exc:
            return web.json_response({"error": str(exc)}, status=400)

    async def get_job(self, request: web.Request) -> web.StreamResponse:
        job = get_job(self.s.queue, request.match_info["job_id"])
        if job is None:
            return web.json_response({"error": "Job not found"}, status=404)
        return web.json_response(job)

    # --- files -------------------------------------------------------------------------------------

    async def view(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        if "filename" not in query:
            return web.Response(status=404)
        filename, annotated = split_annotation(query["filename"])
        if not filename:
            return web.Response(status=400)
        if filename.startswith("/") or ".." in filename:
            return web.Response(status=400)
        base = self.s.dirs.by_type(annotated or query.get("type", "output"))
        if base is None:
            return web.Response(status=400)
        folder = base
        if "subfolder" in query:
            folder = Path(os.path.join(base, query["subfolder"]))
            if not inside(base, folder):
                return web.Response(status=403)
        filename = os.path.basename(filename)
        path = folder / filename
        if not path.is_file():
            return web.Response(status=404)
        disposition = {"Content-Disposition": f'filename="{filename}"'}
        if "preview" in query:
            return _preview(path, query["preview"], query.get("channel", ""), disposition)
        channel = query.get("channel", "rgba")
        if channel in ("rgb", "a"):
            return _channel(path, channel, disposition)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type.startswith("text/html"):
            content_type = "application/octet-stream"  # never serve HTML from the output folder
        return web.FileResponse(path, headers={**disposition, "Content-Type": content_type})

    async def upload_image(self, request: web.Request) -> web.StreamResponse:
        post = await request.post()
        image = post.get("image")
        if not isinstance(image, web.FileField) or not image.filename:
            return web.Response(status=400)
        kind = str(post.get("type") or "input")
        base = self.s.dirs.by_type(kind)
        if base is None:
            base, kind = self.s.dirs.input, "input"
        subfolder = str(post.get("subfolder", ""))
        folder = Path(os.path.join(base, os.path.normpath(subfolder)))
        filename = image.filename
        if not inside(base, folder / filename):
            return web.Response(status=400)
        folder.mkdir(parents=True, exist_ok=True)
        data = image.file.read()
        overwrite = str(post.get("overwrite", "")) in ("true", "1")
        path = folder / filename
        duplicate = False
        if not overwrite:
            stem, suffix = os.path.splitext(filename)
            counter = 1
            while path.exists():
                if hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest():
                    duplicate = True  # identical bytes under that name: reuse it (transcript 02)
                    break
                filename = f"{stem} ({counter}){suffix}"
                path = folder / filename
                counter += 1
        if not duplicate:
            path.write_bytes(data)
        return web.json_response({"name": filename, "subfolder": subfolder, "type": kind})

    # --- information -------------------------------------------------------------------------------

    async def object_info(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({name: node.object_info(self.s.dirs) for name, node in NODES.items()})

    async def object_info_one(self, request: web.Request) -> web.StreamResponse:
        node = NODES.get(request.match_info["node_class"])
        return web.json_response({node.name: node.object_info(self.s.dirs)} if node else {})

    async def system_stats(self, request: web.Request) -> web.StreamResponse:
        ram = 24 * 1024**3
        return web.json_response(
            {
                "system": {
                    "os": sys.platform,
                    "ram_total": ram,
                    "ram_free": ram,
                    "comfyui_version": "0.8.0",
                    "required_frontend_version": "1.35.9",
                    "installed_templates_version": "0.7.67",
                    "required_templates_version": "0.7.67",
                    "python_version": sys.version,
                    "pytorch_version": "stand-in",
                    "embedded_python": False,
                    "argv": self.s.argv,
                },
                "devices": [
                    {
                        "name": "cpu",
                        "type": "cpu",
                        "index": None,
                        "vram_total": ram,
                        "vram_free": ram,
                        "torch_vram_total": ram,
                        "torch_vram_free": ram,
                    }
                ],
            }
        )

    async def features(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(FEATURES)

    async def free(self, request: web.Request) -> web.StreamResponse:
        await _json_body(request)  # accepted and ignored: the stand-in holds no models
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(_MODEL_FOLDERS)

    async def models_folder(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["folder"] not in _MODEL_FOLDERS:
            return web.Response(status=404)
        return web.json_response([])

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([])

    # --- test controls -----------------------------------------------------------------------------

    async def standin_log(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({**self.s.log.to_json(), "held_node": self.s.gate.held_node})

    async def standin_log_clear(self, request: web.Request) -> web.StreamResponse:
        self.s.log.clear()
        return web.Response(status=200)

    async def standin_config(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            body = await _json_body(request)
            try:
                self.s.config.update(body if isinstance(body, dict) else {})
            except (ValueError, TypeError) as exc:
                return web.json_response({"error": str(exc)}, status=400)
            await self.s.gate.notify()
        return web.json_response(self.s.config.to_json())

    async def standin_release(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        count = body.get("count") if isinstance(body, dict) else None
        await self.s.gate.release(int(count) if count is not None else None)
        return web.json_response(self.s.config.to_json())

    async def standin_drop_ws(self, request: web.Request) -> web.StreamResponse:
        """Close a client's socket from the server side, like a dropped connection."""
        body = await _json_body(request)
        conn = self.s.hub.sockets.get(str(body.get("client_id"))) if isinstance(body, dict) else None
        if conn is None:
            return web.json_response({"dropped": False})
        await conn.ws.close()
        return web.json_response({"dropped": True})


def _preview(path: Path, spec: str, channel: str, headers: dict[str, str]) -> web.Response:
    parts = spec.split(";")
    fmt = parts[0] if parts[0] in ("webp", "jpeg") and "a" not in channel else "webp"
    quality = int(parts[-1]) if parts[-1].isdigit() else 90
    buffer = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buffer, format=fmt.upper(), quality=quality)
    return web.Response(body=buffer.getvalue(), content_type=f"image/{fmt}", headers=headers)


def _channel(path: Path, channel: str, headers: dict[str, str]) -> web.Response:
    buffer = io.BytesIO()
    with Image.open(path) as img:
        if channel == "rgb":
            out = img.convert("RGB")
        else:
            alpha = img.getchannel("A") if "A" in img.getbands() else Image.new("L", img.size, 255)
            out = Image.new("RGBA", img.size)
            out.putalpha(alpha)
        out.save(buffer, format="PNG")
    return web.Response(body=buffer.getvalue(), content_type="image/png", headers=headers)
