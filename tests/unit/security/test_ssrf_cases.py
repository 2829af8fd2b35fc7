"""Every case of the SSRF catalog (ssrf_cases.json, a copy of the shared one) as a test, plus the
behaviour around it: size caps, deadlines, content types, redirects, pinning, allowlists.

Nothing here leaves the machine. DNS answers come from the catalog through a stub resolver; the
network backend under the guard is a recorder that either refuses to dial (decision cases) or
dials a loopback test server whatever public address the guard vetted (redirect cases), so the
tests see exactly which address the guard asked to connect to. The catalog's other behaviour
cases talk to loopback servers directly with the loopback test switch on.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from comfyfleet.errors import ValidationFailed
from comfyfleet.security.guarded_http import _BoundedDecoder, guarded_client
from comfyfleet.security.media_fetch import fetch_to_file, sniff_content_type
from comfyfleet.security.ssrf import (
    UrlFetchFailed,
    UrlNotAllowed,
    UrlPolicy,
    address_refusal,
    check_url,
    parse_ip_literal,
)

# Every test here must end on its own within about a second; this only turns a hang into a failure.
pytestmark = pytest.mark.timeout(10)

CATALOG = json.loads(Path(__file__).with_name("ssrf_cases.json").read_text())
CASES = {case["id"]: case for case in CATALOG["cases"]}
DECISION_IDS = [case["id"] for case in CATALOG["cases"] if case["kind"] == "decision"]
REDIRECT_IDS = [case["id"] for case in CATALOG["cases"] if case["kind"] == "behaviour"]
BEHAVIOUR_IDS = [case["id"] for case in CATALOG["behaviour_cases"]]

PUBLIC = "93.184.216.34"  # what the catalog's public.test resolves to; it is never dialled
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
JPEG = b"\xff\xd8\xff\xe0" + bytes(1020)
MEDIA_TYPES = frozenset({"image/png", "image/jpeg"})
MiB = 1 << 20

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- doubles --------------------------------------------------------------------------------------


class StubResolver:
    """Answers from a catalog ``resolve`` map; a list of lists is a sequence of successive answers."""

    def __init__(self, answers: dict[str, Any] | None) -> None:
        self._answers = {
            host: value if value and isinstance(value[0], list) else [value]
            for host, value in (answers or {}).items()
        }
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self._answers:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} is unknown to the test resolver")
        sequence = self._answers[host]
        return list(sequence[min(self.calls.count(host), len(sequence)) - 1])


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Records the addresses the guard asks for. Without ``route_to`` it never dials; with it, it
    dials that loopback port instead of the (public, vetted) address it was asked for."""

    def __init__(self, route_to: int | None = None) -> None:
        self.connects: list[tuple[str, int]] = []
        self._route_to = route_to
        self._real = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append((host, port))
        if self._route_to is None:
            raise httpcore.ConnectError("the test backend never dials out")
        return await self._real.connect_tcp("127.0.0.1", self._route_to, timeout=timeout)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise AssertionError("the guard must never open unix sockets")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def default_port(url: str) -> int:
    parsed = httpx.URL(url)
    return parsed.port or {"http": 80, "https": 443}[parsed.scheme]


def loopback_policy(port: int) -> UrlPolicy:
    return UrlPolicy(allowed_ports=frozenset({port}), allow_loopback=True)


# --- loopback servers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Loopback:
    port: int


Serve = Callable[..., Awaitable[Loopback]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts aiohttp servers on 127.0.0.1 from a {path: handler} map; closes them afterwards."""
    servers: list[TestServer] = []

    async def start(routes: dict[str, Handler], *, tls: ssl.SSLContext | None = None) -> Loopback:
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_route("*", path, handler)
        server = TestServer(app)
        # Handlers are cancelled when the client hangs up (TestServer's default); a short shutdown
        # timeout keeps a stuck handler from holding the teardown.
        await server.start_server(ssl=tls, shutdown_timeout=0.5)
        servers.append(server)
        assert server.port is not None
        return Loopback(server.port)

    yield start
    for server in servers:
        await server.close()


class RawServer:
    """A loopback server that writes exact bytes, for lies aiohttp would not tell."""

    def __init__(self, response: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> None:
        self._response = response
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            await self._response(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


def body(data: bytes, content_type: str = "image/png", **headers: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=data, headers={"Content-Type": content_type, "X-Seen-Host": request.host, **headers}
        )

    return handler


def redirect(location: str, status: int = 302) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": location})

    return handler


def streamed(head: bytes, then: Callable[[web.StreamResponse], Awaitable[None]]) -> Handler:
    """A chunked response (no Content-Length) that writes ``head`` and then whatever ``then`` does."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        await response.prepare(request)
        await response.write(head)
        await then(response)
        return response

    return handler


async def write_forever(response: web.StreamResponse) -> None:
    chunk = bytes(64 * 1024)
    while True:  # ends when the client hangs up (write raises) or the handler is cancelled
        await response.write(chunk)


async def drip_forever(response: web.StreamResponse) -> None:
    while True:
        await asyncio.sleep(5)
        await response.write(b"\x00")


def gzip_of(data_parts: Iterable[bytes]) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join([*(compressor.compress(part) for part in data_parts), compressor.flush()])


# --- TLS material ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A self-signed certificate for public.test, trusted by the client context only."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=public.test",
         "-addext", "subjectAltName=DNS:public.test"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return Tls(server=server, client=ssl.create_default_context(cafile=str(cert)))


# --- catalog: decision cases ----------------------------------------------------------------------


def has_successive_answers(case: dict[str, Any]) -> bool:
    return any(value and isinstance(value[0], list) for value in (case["resolve"] or {}).values())


@pytest.mark.parametrize("case_id", DECISION_IDS)
async def test_catalog_decision(case_id: str) -> None:
    case = CASES[case_id]
    url = case["url"]
    resolver = StubResolver(case["resolve"])
    backend = RecordingBackend()  # refuses to dial: an allowed request ends in UrlFetchFailed
    policy = UrlPolicy()
    client = guarded_client(policy, purpose="media", resolver=resolver, network_backend=backend)

    async with client:
        if case["expected"] == "allow":
            vetted = await check_url(url, policy, resolver)
            with pytest.raises(UrlFetchFailed):
                await client.get(url)
            # The connection was asked of the vetted address, never of the name.
            assert backend.connects == [(vetted[0], default_port(url))]
        elif has_successive_answers(case):
            # DNS rebinding: the submit-time check sees the first (public) answer...
            first = next(iter(case["resolve"].values()))[0]
            assert await check_url(url, policy, resolver) == first
            # ...and the fetch resolves again, sees the refused answer and dials nothing.
            with pytest.raises(UrlNotAllowed):
                await client.get(url)
            assert backend.connects == []
        else:
            with pytest.raises(UrlNotAllowed):
                await check_url(url, policy, resolver)
            with pytest.raises(UrlNotAllowed):
                await client.get(url)
            assert backend.connects == []


async def test_one_connection_resolves_once_and_dials_the_vetted_address(serve: Serve) -> None:
    server = await serve({"/image.png": body(PNG)})
    resolver = StubResolver(CASES["dns-rebinding"]["resolve"])  # public first, loopback after
    backend = RecordingBackend(route_to=server.port)
    async with guarded_client(UrlPolicy(), purpose="media", resolver=resolver, network_backend=backend) as c:
        response = await c.get("http://rebind.test/image.png")
    assert response.status_code == 200
    assert resolver.calls == ["rebind.test"]
    assert backend.connects == [(PUBLIC, 80)]
    assert response.headers["X-Seen-Host"] == "rebind.test"  # the Host header kept the name


async def test_https_connects_to_the_vetted_address_but_verifies_the_name(serve: Serve, tls: Tls) -> None:
    server = await serve({"/image.png": body(PNG)}, tls=tls.server)
    backend = RecordingBackend(route_to=server.port)
    resolver = StubResolver({"public.test": [PUBLIC]})
    async with guarded_client(
        UrlPolicy(), purpose="media", resolver=resolver, network_backend=backend, verify=tls.client
    ) as client:
        response = await client.get("https://public.test/image.png")
    assert response.status_code == 200
    assert response.content == PNG
    assert backend.connects == [(PUBLIC, 443)]
    assert response.headers["X-Seen-Host"] == "public.test"


async def test_https_certificate_for_another_name_is_refused(serve: Serve, tls: Tls) -> None:
    server = await serve({"/image.png": body(PNG)}, tls=tls.server)
    resolver = StubResolver({"other.test": [PUBLIC]})
    backend = RecordingBackend(route_to=server.port)
    async with guarded_client(
        UrlPolicy(), purpose="media", resolver=resolver, network_backend=backend, verify=tls.client
    ) as client:
        with pytest.raises(UrlFetchFailed):
            await client.get("https://other.test/image.png")


# --- catalog: redirect behaviour cases ------------------------------------------------------------


@dataclass(frozen=True)
class RedirectScenario:
    routes: dict[str, Handler]
    error: type[ValidationFailed]
    match: str
    tls: bool = False


REDIRECT_SCENARIOS = {
    "redirect-to-imds": RedirectScenario(
        {"/r": redirect("http://169.254.169.254/")}, UrlNotAllowed, "169.254.169.254 is a cloud metadata"
    ),
    "redirect-downgrade": RedirectScenario(
        {"/r": redirect("http://public.test/image.png"), "/image.png": body(PNG)},
        UrlNotAllowed,
        "from https to http",
        tls=True,
    ),
    "redirect-chain": RedirectScenario(
        {
            "/r1": redirect("/r2"),
            "/r2": redirect("/r3", 301),
            "/r3": redirect("/r4", 307),
            "/r4": redirect("/r5", 308),
            "/r5": body(PNG),
        },
        UrlFetchFailed,
        "more than 3 redirects",
    ),
}


@pytest.mark.parametrize("case_id", REDIRECT_IDS)
async def test_catalog_redirect_behaviour(
    case_id: str, serve: Serve, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    case = CASES[case_id]
    scenario = REDIRECT_SCENARIOS.get(case_id)
    if scenario is None:
        pytest.fail(f"catalog case {case_id} has no scenario in this test module")
    tls: Tls | None = request.getfixturevalue("tls") if scenario.tls else None
    server = await serve(scenario.routes, tls=tls.server if tls else None)
    backend = RecordingBackend(route_to=server.port)
    async with guarded_client(
        UrlPolicy(),
        purpose="media",
        resolver=StubResolver(case["resolve"]),
        network_backend=backend,
        verify=tls.client if tls else True,
    ) as client:
        with pytest.raises(scenario.error, match=scenario.match):
            await fetch_to_file(
                client, case["url"], tmp_path / "m.png", max_bytes=MiB,
                allowed_content_types=MEDIA_TYPES, total_timeout=2.0,
            )  # fmt: skip
    assert {host for host, _port in backend.connects} == {PUBLIC}
    assert list(tmp_path.iterdir()) == []


async def test_redirect_to_imds_never_reaches_it_from_a_webhook(serve: Serve) -> None:
    server = await serve({"/r": redirect("http://169.254.169.254/")})
    backend = RecordingBackend(route_to=server.port)
    resolver = StubResolver(CASES["redirect-to-imds"]["resolve"])
    async with guarded_client(
        UrlPolicy(), purpose="webhook", resolver=resolver, network_backend=backend
    ) as c:
        with pytest.raises(UrlFetchFailed, match="redirects are not followed"):
            await c.post("http://public.test/r", content=b"{}")
    assert backend.connects == [(PUBLIC, 80)]


async def test_three_redirects_are_followed(serve: Serve, tmp_path: Path) -> None:
    routes = {"/r1": redirect("/r2"), "/r2": redirect("/r3"), "/r3": redirect("/r4"), "/r4": body(PNG)}
    server = await serve(routes)
    backend = RecordingBackend(route_to=server.port)
    resolver = StubResolver({"public.test": [PUBLIC]})
    async with guarded_client(UrlPolicy(), purpose="media", resolver=resolver, network_backend=backend) as c:
        media = await fetch_to_file(
            c, "http://public.test/r1", tmp_path / "m.png", max_bytes=MiB,
            allowed_content_types=MEDIA_TYPES, total_timeout=2.0,
        )  # fmt: skip
    assert media.final_url == "http://public.test/r4"
    assert media.path.read_bytes() == PNG


async def test_redirect_to_an_odd_scheme_is_refused(serve: Serve) -> None:
    server = await serve({"/r": redirect("file:///etc/passwd")})
    policy = loopback_policy(server.port)
    async with guarded_client(policy, purpose="media") as client:
        with pytest.raises(UrlNotAllowed, match="scheme"):
            await client.get(f"http://127.0.0.1:{server.port}/r")


async def test_webhook_delivery_succeeds_without_redirects(serve: Serve) -> None:
    async def receive(request: web.Request) -> web.StreamResponse:
        return web.json_response({"got": (await request.read()).decode()})

    server = await serve({"/hook": receive})
    async with guarded_client(loopback_policy(server.port), purpose="webhook") as client:
        response = await client.post(f"http://127.0.0.1:{server.port}/hook", content=b"event")
    assert response.json() == {"got": "event"}


# --- catalog: fetch behaviour cases ---------------------------------------------------------------


async def fetch_loopback(
    port: int,
    path: str,
    dest: Path,
    *,
    max_bytes: int = MiB,
    total_timeout: float = 2.0,
    types: frozenset[str] = MEDIA_TYPES,
) -> Any:
    async with guarded_client(loopback_policy(port), purpose="media") as client:
        return await fetch_to_file(
            client, f"http://127.0.0.1:{port}{path}", dest,
            max_bytes=max_bytes, allowed_content_types=types, total_timeout=total_timeout,
        )  # fmt: skip


async def oversize_body(serve: Serve, tmp_path: Path) -> None:
    # Chunked, so no Content-Length warns us: the streaming cap has to stop it.
    async def two_mib(response: web.StreamResponse) -> None:
        await response.write(bytes(2 * MiB))

    server = await serve({"/big": streamed(PNG, two_mib)})
    with pytest.raises(UrlFetchFailed, match="exceeds"):
        await fetch_loopback(server.port, "/big", tmp_path / "m.png")


async def lying_content_length(serve: Serve, tmp_path: Path) -> None:
    # Content-Length 10 beside a chunked body of 10 MB: Transfer-Encoding wins in HTTP/1.1, so the
    # body keeps coming; the client stops at the 11th byte instead of trusting the header.
    async def chunked_lie(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 10\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = PNG + bytes(64 * 1024 - len(PNG))
        for _ in range(160):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()

    async with RawServer(chunked_lie) as server:
        with pytest.raises(UrlFetchFailed, match="longer than its Content-Length"):
            await fetch_loopback(server.port, "/", tmp_path / "m.png")
    assert list(tmp_path.iterdir()) == []

    # Content-Length 10 followed by 10 MB of raw bytes: exactly 10 bytes are read, the rest never.
    async def plain_lie(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 10\r\n\r\n")
        for _ in range(160):
            writer.write(PNG + bytes(64 * 1024 - len(PNG)))
            await writer.drain()

    async with RawServer(plain_lie) as server:
        media = await fetch_loopback(server.port, "/", tmp_path / "m.png")
    assert media.size == 10
    assert media.path.read_bytes() == PNG[:10]
    media.path.unlink()


async def slow_drip(serve: Serve, tmp_path: Path) -> None:
    server = await serve({"/drip": streamed(PNG[:8], drip_forever)})
    # The read timeout (15 s) would never fire on a byte every 5 s; only the total deadline can.
    with pytest.raises(UrlFetchFailed, match="no complete download within"):
        await fetch_loopback(server.port, "/drip", tmp_path / "m.png", total_timeout=0.3)


async def gzip_bomb(serve: Serve, tmp_path: Path) -> None:
    bomb = gzip_of([PNG, *(bytes(MiB) for _ in range(64))])  # 64 MiB that travels as ~64 KiB
    assert len(bomb) < MiB
    server = await serve({"/bomb": body(bomb, **{"Content-Encoding": "gzip"})})
    with pytest.raises(UrlFetchFailed, match="exceeds"):
        await fetch_loopback(server.port, "/bomb", tmp_path / "m.png")


async def wrong_content_type(serve: Serve, tmp_path: Path) -> None:
    html = b"<!doctype html><html><body>hello</body></html>"
    server = await serve({"/honest": body(html, "text/html"), "/lying": body(html, "image/png")})
    with pytest.raises(UrlFetchFailed, match="text/html is not allowed"):
        await fetch_loopback(server.port, "/honest", tmp_path / "m.png")
    with pytest.raises(UrlFetchFailed, match="not a recognised media format"):
        await fetch_loopback(server.port, "/lying", tmp_path / "m.png")


async def endless_stream(serve: Serve, tmp_path: Path) -> None:
    server = await serve({"/endless": streamed(PNG, write_forever)})
    with pytest.raises(UrlFetchFailed, match="exceeds"):
        await fetch_loopback(server.port, "/endless", tmp_path / "m.png", max_bytes=256 * 1024)


BEHAVIOURS: dict[str, Callable[[Serve, Path], Awaitable[None]]] = {
    "oversize-body": oversize_body,
    "lying-content-length": lying_content_length,
    "slow-drip": slow_drip,
    "gzip-bomb": gzip_bomb,
    "wrong-content-type": wrong_content_type,
    "endless-stream": endless_stream,
}


@pytest.mark.parametrize("case_id", BEHAVIOUR_IDS)
async def test_catalog_fetch_behaviour(case_id: str, serve: Serve, tmp_path: Path) -> None:
    behaviour = BEHAVIOURS.get(case_id)
    if behaviour is None:
        pytest.fail(f"catalog behaviour {case_id} has no test in this module")
    await behaviour(serve, tmp_path)
    assert list(tmp_path.iterdir()) == [], "a refused download must leave nothing on disk"


# --- media fetch: the allowed path and the other refusals -----------------------------------------


async def test_fetch_stores_the_file_and_reports_the_sniffed_type(serve: Serve, tmp_path: Path) -> None:
    server = await serve({"/a": body(PNG, "application/octet-stream"), "/b": body(JPEG, "image/jpg")})
    png = await fetch_loopback(server.port, "/a", tmp_path / "a.png")
    jpeg = await fetch_loopback(server.port, "/b", tmp_path / "b.jpg")
    assert (png.content_type, png.size, png.path.read_bytes()) == ("image/png", len(PNG), PNG)
    assert png.final_url == f"http://127.0.0.1:{server.port}/a"
    assert (jpeg.content_type, jpeg.size) == ("image/jpeg", len(JPEG))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.jpg"]


@pytest.mark.parametrize("wbits", [16 + zlib.MAX_WBITS, zlib.MAX_WBITS, -zlib.MAX_WBITS])
async def test_compressed_bodies_are_decoded(wbits: int, serve: Serve, tmp_path: Path) -> None:
    compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
    data = compressor.compress(PNG * 100) + compressor.flush()
    encoding = "gzip" if wbits > zlib.MAX_WBITS else "deflate"
    server = await serve({"/z": body(data, **{"Content-Encoding": encoding})})
    media = await fetch_loopback(server.port, "/z", tmp_path / "m.png")
    assert media.path.read_bytes() == PNG * 100


async def test_declared_length_over_the_cap_is_refused_before_the_body(serve: Serve, tmp_path: Path) -> None:
    server = await serve({"/big": body(PNG + bytes(2 * MiB))})
    with pytest.raises(UrlFetchFailed, match="Content-Length"):
        await fetch_loopback(server.port, "/big", tmp_path / "m.png")
    assert list(tmp_path.iterdir()) == []


async def test_bytes_contradicting_the_declared_type_are_refused(serve: Serve, tmp_path: Path) -> None:
    server = await serve({"/x": body(PNG, "image/jpeg")})
    with pytest.raises(UrlFetchFailed, match="declared content type image/jpeg but the bytes are image/png"):
        await fetch_loopback(server.port, "/x", tmp_path / "m.png")


async def test_sniffed_type_outside_the_allowlist_is_refused(serve: Serve, tmp_path: Path) -> None:
    server = await serve({"/x": body(PNG, "application/octet-stream")})
    with pytest.raises(UrlFetchFailed, match="image/png is not allowed"):
        await fetch_loopback(server.port, "/x", tmp_path / "m.png", types=frozenset({"image/jpeg"}))


async def test_error_status_is_a_fetch_failure(serve: Serve, tmp_path: Path) -> None:
    server = await serve({"/png": body(PNG)})
    with pytest.raises(UrlFetchFailed, match="HTTP 404"):
        await fetch_loopback(server.port, "/missing", tmp_path / "m.png")


async def test_loopback_is_refused_without_the_test_switch(serve: Serve, tmp_path: Path) -> None:
    server = await serve({"/png": body(PNG)})
    policy = UrlPolicy(allowed_ports=frozenset({server.port}))
    async with guarded_client(policy, purpose="media") as client:
        with pytest.raises(UrlNotAllowed, match="loopback"):
            await fetch_to_file(
                client, f"http://127.0.0.1:{server.port}/png", tmp_path / "m.png", max_bytes=MiB,
                allowed_content_types=MEDIA_TYPES, total_timeout=2.0,
            )  # fmt: skip


async def test_a_non_streamed_answer_is_capped_and_decoded(serve: Serve) -> None:
    server = await serve(
        {
            "/endless": streamed(b"{", write_forever),
            "/bomb": body(gzip_of(bytes(MiB) for _ in range(64)), **{"Content-Encoding": "gzip"}),
            "/json": body(gzip_of([b'{"ok": true}']), "application/json", **{"Content-Encoding": "gzip"}),
        }
    )
    base = f"http://127.0.0.1:{server.port}"
    async with guarded_client(loopback_policy(server.port), purpose="webhook", max_body_bytes=MiB) as client:
        for path in ("/endless", "/bomb"):
            with pytest.raises(UrlFetchFailed, match="exceeds"):
                await client.post(base + path, content=b"event")
        answer = await client.post(base + "/json", content=b"event")
    assert answer.json() == {"ok": True}
    assert "content-encoding" not in answer.headers


async def test_fetch_refuses_an_unguarded_client_and_a_malformed_url(tmp_path: Path) -> None:
    async with httpx.AsyncClient() as plain:
        with pytest.raises(TypeError):
            await fetch_to_file(
                plain, "http://public.test/", tmp_path / "m.png", max_bytes=MiB,
                allowed_content_types=MEDIA_TYPES, total_timeout=1.0,
            )  # fmt: skip
    async with guarded_client(UrlPolicy(), purpose="media", network_backend=RecordingBackend()) as client:
        with pytest.raises(UrlNotAllowed, match="not a valid URL"):
            await fetch_to_file(
                client, "http://[::1/", tmp_path / "m.png", max_bytes=MiB,
                allowed_content_types=MEDIA_TYPES, total_timeout=1.0,
            )  # fmt: skip


async def test_cookies_are_never_kept_between_requests(serve: Serve) -> None:
    async def set_cookie(request: web.Request) -> web.StreamResponse:
        response = web.Response(text=request.headers.get("Cookie", "none"))
        response.set_cookie("session", "tenant-a")
        return response

    server = await serve({"/c": set_cookie})
    async with guarded_client(loopback_policy(server.port), purpose="webhook") as client:
        await client.get(f"http://127.0.0.1:{server.port}/c")
        second = await client.get(f"http://127.0.0.1:{server.port}/c")
    assert second.text == "none"


def test_bounded_decoder_never_inflates_a_whole_bomb_at_once() -> None:
    bomb = gzip_of([bytes(MiB) for _ in range(16)])
    pieces = _BoundedDecoder("gzip").feed(bomb)
    first = next(pieces)  # a generator: the rest is only inflated when asked for
    assert len(first) <= 64 * 1024


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (PNG, "image/png"),
        (JPEG, "image/jpeg"),
        (b"GIF89a" + bytes(10), "image/gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "audio/wav"),
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00", "video/mp4"),
        (b"\x00\x00\x00\x14ftypqt  \x00\x00\x02\x00", "video/quicktime"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", "video/webm"),
        (b"ID3\x04\x00" + bytes(10), "audio/mpeg"),
        (b"\xff\xfb\x90\x00" + bytes(10), "audio/mpeg"),
        (b"fLaC\x00\x00\x00\x22", "audio/flac"),
        (b"OggS\x00\x02" + bytes(20), "audio/ogg"),
        (b"<!doctype html>", None),
        (b"\xff\xfe<\x00h\x00", None),  # UTF-16 text, not an MPEG frame
        (b"\x1f\x8b\x08\x00", None),  # gzip is not media
    ],
)
def test_sniffing(head: bytes, expected: str | None) -> None:
    assert sniff_content_type(head) == expected


# --- decisions beyond the catalog -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1.1", "10.1.0.1"),
        ("1572395042", PUBLIC),
        ("127.0.0.1.", "127.0.0.1"),
        ("[::1]", "::1"),
        ("public.test", None),
        ("1.2.3.4.5", None),
        ("256.1.1.1", None),
        ("08.1.1.1", None),
    ],
)
def test_odd_ipv4_spellings_are_read_as_inet_aton_does(host: str, address: str | None) -> None:
    parsed = parse_ip_literal(host)
    assert (str(parsed) if parsed else None) == address


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("64:ff9b::5db8:d822", True),  # NAT64 of 93.184.216.34: public
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("64:ff9b:1::a00:1", False),  # local-use NAT64 that may embed a private address
        ("2002:7f00:1::", False),  # 6to4
        ("2001:0:4136:e378::1", False),  # Teredo
        ("2001:db8::1", False),  # documentation
        ("2001:2::1", False),  # benchmarking
        ("::7f00:1", False),  # IPv4-compatible
        ("fe80::1", False),
        ("198.18.0.1", False),  # benchmarking
        ("192.0.2.1", False),  # documentation
        ("255.255.255.255", False),
        ("224.0.0.1", False),
        ("168.63.129.16", False),  # Azure wireserver: public, but metadata
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
    ],
)
def test_address_verdicts(address: str, allowed: bool) -> None:
    import ipaddress

    assert (address_refusal(ipaddress.ip_address(address), UrlPolicy()) is None) is allowed


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://cdn.example.com/x.png", True),
        ("https://example.com/x.png", True),
        ("https://a.b.example.com./x.png", True),  # trailing dot
        ("https://evilexample.com/x.png", False),  # suffix match is on whole labels
        ("https://example.com.evil.test/x.png", False),
        ("https://93.184.216.34/x.png", False),  # an allowlist admits names only
        ("https://bücher.example/x.png", True),  # IDN, matched in its punycode form
    ],
)
async def test_deployment_allowlist(url: str, allowed: bool) -> None:
    resolver = StubResolver(
        {h: [PUBLIC] for h in ("cdn.example.com", "example.com", "a.b.example.com", "evilexample.com",
                               "example.com.evil.test", "xn--bcher-kva.example")}
    )  # fmt: skip
    policy = UrlPolicy(allowed_domains=frozenset({"*.Example.com", "BÜCHER.example."}))
    if allowed:
        assert await check_url(url, policy, resolver) == [PUBLIC]
    else:
        with pytest.raises(UrlNotAllowed, match="allowlist"):
            await check_url(url, policy, resolver)


async def test_tenant_allowlist_narrows_but_never_widens() -> None:
    resolver = StubResolver({"a.example.com": [PUBLIC], "b.example.com": [PUBLIC], "other.test": [PUBLIC]})
    policy = UrlPolicy(allowed_domains=frozenset({"example.com"})).with_tenant_allowlist(["a.example.com"])
    assert await check_url("https://a.example.com/", policy, resolver) == [PUBLIC]
    with pytest.raises(UrlNotAllowed, match="tenant allowlist"):
        await check_url("https://b.example.com/", policy, resolver)
    widened = UrlPolicy(allowed_domains=frozenset({"example.com"})).with_tenant_allowlist(["other.test"])
    with pytest.raises(UrlNotAllowed, match="deployment allowlist"):
        await check_url("https://other.test/", widened, resolver)


@pytest.mark.parametrize(
    "url",
    [
        "http://METADATA.google.internal./",
        "http://instance-data/",
        "http://printer.local/",
        "http://svc.internal/",
        "http://router.home.arpa/",
        "http://redis/",
        "http://[fe80::1%25eth0]/",
        "http://someone@public.test/",
        "https://public.test:8443/",
    ],
)
async def test_names_and_shapes_refused_without_dns(url: str) -> None:
    resolver = StubResolver({"public.test": [PUBLIC]})
    with pytest.raises(UrlNotAllowed):
        await check_url(url, UrlPolicy(), resolver)
    assert resolver.calls == []


async def test_resolver_failures_are_fetch_failures_and_garbage_is_refused() -> None:
    class Garbage:
        async def resolve(self, host: str, port: int) -> list[str]:
            return ["not-an-ip"]

    class Empty:
        async def resolve(self, host: str, port: int) -> list[str]:
            return []

    with pytest.raises(UrlFetchFailed, match="does not resolve"):
        await check_url("http://nowhere.test/", UrlPolicy(), StubResolver({}))
    with pytest.raises(UrlFetchFailed, match="no addresses"):
        await check_url("http://nowhere.test/", UrlPolicy(), Empty())
    with pytest.raises(UrlNotAllowed, match="not an address"):
        await check_url("http://nowhere.test/", UrlPolicy(), Garbage())


async def test_the_loopback_switch_admits_loopback_only() -> None:
    policy = UrlPolicy(allow_loopback=True)
    assert await check_url("http://127.0.0.1/", policy, StubResolver({})) == ["127.0.0.1"]
    assert await check_url("http://localhost/", policy, StubResolver({"localhost": ["::1"]})) == ["::1"]
    for url in ("http://10.0.0.1/", "http://[::ffff:127.0.0.1]/", "http://169.254.169.254/"):
        with pytest.raises(UrlNotAllowed):
            await check_url(url, policy, StubResolver({}))


def test_errors_map_to_422_with_their_codes() -> None:
    refused, failed = UrlNotAllowed("because"), UrlFetchFailed("because")
    assert isinstance(refused, ValidationFailed) and isinstance(failed, ValidationFailed)
    assert (refused.status_code, refused.code, refused.reason) == (422, "url_not_allowed", "because")
    assert (failed.status_code, failed.code, failed.details) == (
        422,
        "url_fetch_failed",
        {"reason": "because"},
    )


def test_catalog_copy_matches_the_shared_catalog() -> None:
    shared = Path("/work/shared/security/ssrf_cases.json")
    if not shared.exists():
        pytest.skip("the shared catalog is not on this machine")
    assert json.loads(shared.read_text()) == CATALOG
