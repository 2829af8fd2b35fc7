"""A webhook receiver for the tests: an aiohttp server on loopback that checks every delivery with the
``standardwebhooks`` package (not our code), then answers as the test scripted it.

Each path is one "endpoint" (``/a``, ``/slow``...). A test registers the secrets a path should accept
with ``accept``, scripts answers with ``answer`` (a queue of statuses/headers, then a default), and can
make a path hang until released. The server can go down and come back on the same port.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


@dataclass(frozen=True)
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    def payload(self, secret: str) -> Any:
        """The body, verified with this one secret (raises WebhookVerificationError if it does not sign)."""
        return Webhook(secret).verify(self.body, self.headers)


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class Receiver:
    def __init__(self) -> None:
        self.secrets: dict[str, list[str]] = defaultdict(list)
        self.scripts: dict[str, list[Answer]] = defaultdict(list)
        self.defaults: dict[str, Answer] = {}
        self.deliveries: list[Delivery] = []
        self.arrived: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.hang_until: dict[str, asyncio.Event] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # -------------------------------------------------------- scripting

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def accept(self, path: str, *secrets: str) -> None:
        self.secrets[path].extend(secrets)

    def answer(self, path: str, *answers: Answer, default: Answer | None = None) -> None:
        self.scripts[path].extend(answers)
        if default is not None:
            self.defaults[path] = default

    def hang(self, path: str) -> asyncio.Event:
        """Requests to ``path`` never answer until the returned event is set."""
        release = self.hang_until[path] = asyncio.Event()
        return release

    def at(self, path: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.path == path]

    # -------------------------------------------------------- serving

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verified = False
        for secret in self.secrets.get(path, []):
            try:
                Webhook(secret).verify(body, headers)
            except WebhookVerificationError:
                continue
            verified = True
        self.deliveries.append(Delivery(path, headers, body, verified))
        self.arrived[path].set()
        release = self.hang_until.get(path)
        if release is not None:
            await release.wait()
        script = self.scripts[path]
        answer = script.pop(0) if script else self.defaults.get(path, Answer())
        return web.Response(status=answer.status, headers=answer.headers, text="ok")

    async def start(self) -> None:
        """Listen (again) on 127.0.0.1; the first start picks a free port, later ones reuse it."""
        if self._runner is None:
            app = web.Application()
            app.router.add_post("/{path}", self._handle)
            self._runner = web.AppRunner(app, shutdown_timeout=1.0)
            await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def go_down(self) -> None:
        """Stop listening: deliveries now fail with a refused connection."""
        assert self._site is not None
        await self._site.stop()
        self._site = None

    async def close(self) -> None:
        for release in self.hang_until.values():
            release.set()
        if self._runner is not None:
            await self._runner.cleanup()
