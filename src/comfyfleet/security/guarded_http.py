"""The one HTTP client for user-supplied URLs: an httpx transport that connects only to vetted addresses.

How a request travels::

    GuardedAsyncClient.send        redirects followed here, hop by hop (never by httpx), total deadline
      └─ GuardedTransport          check_request_url: scheme, userinfo, port, host name, allowlist
          └─ httpx.AsyncHTTPTransport / httpcore pool   (HTTP/1.1, keep-alive, TLS, timeouts)
              └─ _PinningBackend.connect_tcp(host)      resolve ONCE, vet every address,
                  └─ real backend.connect_tcp(vetted IP) connect to the vetted IP, never the name

httpcore hands the backend the URL's host name and, for https, later calls
``start_tls(server_hostname=<that host name>)`` on the stream we return. Resolving inside the
backend therefore pins the TCP connection to the address we checked (a second DNS answer can never
be used) while the Host header, SNI and certificate verification stay on the original name.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import AsyncGenerator, Iterable, Iterator
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import TYPE_CHECKING, Any, Literal

import httpcore
import httpx

from comfyfleet.security.ssrf import (
    Resolver,
    SystemResolver,
    UrlFetchFailed,
    UrlNotAllowed,
    UrlPolicy,
    check_request_url,
    vet_host,
)

if TYPE_CHECKING:
    from httpx._client import UseClientDefault
    from httpx._types import AuthTypes

__all__ = [
    "GuardedAsyncClient",
    "GuardedTransport",
    "Purpose",
    "capped_body",
    "content_length",
    "guarded_client",
]

Purpose = Literal["media", "webhook"]

# Media downloads may pass through a CDN or a short-link service; webhooks are configured by the
# tenant with their final URL, and following a redirect would let an endpoint bounce a signed
# delivery elsewhere.
MAX_REDIRECTS: dict[Purpose, int] = {"media": 3, "webhook": 0}

_PIECE = 64 * 1024  # largest block of decoded body bytes held in memory at once
DEFAULT_MAX_BODY_BYTES = 1 << 20  # non-streamed answers (webhook replies) are small or ignored

_SocketOption = tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]


class _PinningBackend(httpcore.AsyncNetworkBackend):
    """Resolves and vets the host at connect time, then connects the socket to a vetted address."""

    def __init__(self, policy: UrlPolicy, resolver: Resolver, inner: httpcore.AsyncNetworkBackend) -> None:
        self._policy = policy
        self._resolver = resolver
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[_SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await vet_host(host, port, self._policy, self._resolver, timeout=timeout)
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc  # every address is vetted, so falling back to the next one is safe
        assert failure is not None  # vet_host never returns an empty list
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[_SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise UrlNotAllowed("unix sockets are not reachable through the guarded client")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _PinnedHTTPTransport(httpx.AsyncHTTPTransport):
    """httpx's transport (request/response mapping, exception mapping) over a pinning pool.

    httpx offers no ``network_backend`` argument, so the pool it builds is replaced by an
    identical one that has ours. ``_pool`` is private: fail loudly at construction if it moves.
    """

    def __init__(
        self, backend: httpcore.AsyncNetworkBackend, *, verify: ssl.SSLContext | bool, limits: httpx.Limits
    ) -> None:
        super().__init__(verify=verify, trust_env=False, limits=limits)
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            raise RuntimeError("httpx.AsyncHTTPTransport no longer keeps an httpcore pool in _pool")
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=backend,
        )


class GuardedTransport(httpx.AsyncBaseTransport):
    """Refuses URLs the policy forbids and connects only to vetted addresses.

    Every request is judged on its own, so a redirect hop (a new request) is judged like the first.
    ``network_backend`` is the real socket layer (httpcore's anyio backend by default); tests pass
    one that records which address it was asked to connect to.
    """

    def __init__(
        self,
        policy: UrlPolicy,
        *,
        resolver: Resolver | None = None,
        network_backend: httpcore.AsyncNetworkBackend | None = None,
        verify: ssl.SSLContext | bool = True,
        limits: httpx.Limits | None = None,
    ) -> None:
        self._policy = policy
        backend = _PinningBackend(
            policy, resolver or SystemResolver(), network_backend or httpcore.AnyIOBackend()
        )
        self._inner = _PinnedHTTPTransport(backend, verify=verify, limits=limits or httpx.Limits())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        check_request_url(request.url, self._policy)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def _with_content(response: httpx.Response, content: bytes) -> httpx.Response:
    """A copy of ``response`` carrying the already decoded (and size-capped) body."""
    headers = [
        (k, v)
        for k, v in response.headers.multi_items()
        if k.lower() not in ("content-encoding", "content-length")
    ]
    return httpx.Response(
        response.status_code,
        headers=headers,
        content=content,
        request=response.request,
        extensions=response.extensions,
        history=response.history,
    )


def _cookieless_jar() -> CookieJar:
    # One client serves many tenants; a cookie set by one tenant's server must never ride along
    # on another tenant's request. An empty allowed_domains list makes the jar accept nothing.
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.raw_host, a.port) == (b.scheme, b.raw_host, b.port)


class GuardedAsyncClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` that follows redirects itself and enforces a total deadline.

    httpx's own redirect handling is never used: every hop is re-checked by the transport, and
    here the hop count is capped per purpose and an https -> http downgrade is refused.
    Transport failures surface as ``UrlFetchFailed``; policy refusals as ``UrlNotAllowed``.
    """

    def __init__(
        self,
        *,
        purpose: Purpose,
        total_timeout: float | None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.purpose: Purpose = purpose
        self.max_redirects = MAX_REDIRECTS[purpose]
        self.total_timeout = total_timeout
        self.max_body_bytes = max_body_bytes

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: AuthTypes | UseClientDefault | None = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: bool | UseClientDefault = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        follow = follow_redirects if isinstance(follow_redirects, bool) else self.follow_redirects
        deadline = asyncio.timeout(self.total_timeout)
        try:
            async with deadline:
                return await self._send_hops(request, stream=stream, auth=auth, follow=follow)
        except TimeoutError as exc:
            if deadline.expired():
                raise UrlFetchFailed(f"no complete answer within {self.total_timeout} s") from exc
            raise
        except httpx.TimeoutException as exc:
            raise UrlFetchFailed(f"timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise UrlFetchFailed(f"request failed ({type(exc).__name__})") from exc

    async def _send_hops(
        self, request: httpx.Request, *, stream: bool, auth: AuthTypes | UseClientDefault | None, follow: bool
    ) -> httpx.Response:
        history: list[httpx.Response] = []
        while True:
            response = await super().send(request, stream=True, auth=auth, follow_redirects=False)
            if self.max_redirects == 0 and 300 <= response.status_code < 400:
                await response.aclose()
                raise UrlFetchFailed(
                    f"redirects are not followed for {self.purpose} (HTTP {response.status_code})"
                )
            if not (follow and response.is_redirect):
                break
            await response.aclose()  # a redirect's body is never read: it could be arbitrarily large
            history.append(response)
            if len(history) > self.max_redirects:
                raise UrlFetchFailed(f"more than {self.max_redirects} redirects")
            request = self._redirect_request(request, response)
        response.history = history
        if stream:
            return response
        try:
            content = b"".join([piece async for piece in capped_body(response, self.max_body_bytes)])
        finally:
            await response.aclose()
        return _with_content(response, content)

    def _redirect_request(self, request: httpx.Request, response: httpx.Response) -> httpx.Request:
        try:
            url = request.url.join(response.headers["location"])
        except (httpx.InvalidURL, UnicodeError) as exc:
            raise UrlNotAllowed("redirect to an invalid URL") from exc
        if url.scheme not in ("http", "https"):
            raise UrlNotAllowed(f"redirect to scheme {url.scheme!r}")
        if request.url.scheme == "https" and url.scheme == "http":
            raise UrlNotAllowed("redirect from https to http")
        # RFC 9110 15.4: 303 (and, by universal practice, 301/302 after POST) become a GET.
        method = request.method
        if (response.status_code == 303 and method != "HEAD") or (
            response.status_code in (301, 302) and method == "POST"
        ):
            method = "GET"
        keep_body = method == request.method
        dropped = {"host"}
        if not keep_body:
            dropped |= {"content-length", "content-type", "transfer-encoding"}
        if not _same_origin(request.url, url):
            dropped |= {"authorization", "cookie", "proxy-authorization"}
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() not in dropped]
        # Built without a stream so httpx fills in the new Host header; a kept body (307/308) is
        # re-attached afterwards with its original framing headers, which were not dropped.
        redirected = httpx.Request(method, url, headers=headers, extensions=request.extensions)
        if keep_body:
            redirected.stream = request.stream
        return redirected


class _BoundedDecoder:
    """Content-Encoding decoding that never produces more than ``_PIECE`` bytes per step."""

    def __init__(self, encoding: str) -> None:
        encoding = encoding.strip().lower()
        if encoding in ("", "identity"):
            self._wbits: int | None = None
        elif encoding in ("gzip", "x-gzip"):
            self._wbits = 16 + zlib.MAX_WBITS
        elif encoding == "deflate":
            self._wbits = zlib.MAX_WBITS  # zlib-wrapped; raw deflate is detected on the first error
        else:
            # We only advertise gzip and deflate; anything else cannot be decoded with a bound.
            raise UrlFetchFailed(f"unsupported Content-Encoding {encoding!r}")
        self._zlib = zlib.decompressobj(self._wbits) if self._wbits is not None else None
        self._started = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._zlib is None:
            for start in range(0, len(data), _PIECE):
                yield data[start : start + _PIECE]
            return
        try:
            yield from self._inflate(data)
        except zlib.error as exc:
            if self._started or self._wbits != zlib.MAX_WBITS:
                raise UrlFetchFailed("the compressed body is corrupt") from exc
            # Some servers send raw deflate under "deflate" (the RFC says zlib-wrapped).
            self._wbits = -zlib.MAX_WBITS
            self._zlib = zlib.decompressobj(self._wbits)
            yield from self._inflate(data)

    def _inflate(self, data: bytes) -> Iterator[bytes]:
        assert self._zlib is not None and self._wbits is not None
        pending = data
        while True:
            out = self._zlib.decompress(pending, _PIECE)
            if out:
                self._started = True
                yield out
            pending = self._zlib.unconsumed_tail
            if self._zlib.eof and self._zlib.unused_data:
                # Concatenated gzip members (allowed by RFC 1952): start the next one.
                pending = self._zlib.unused_data
                self._zlib = zlib.decompressobj(self._wbits)
                continue
            # A full piece may leave output buffered inside zlib even when no input is left.
            if not pending and len(out) < _PIECE:
                return

    def flush(self) -> bytes:
        # After the input is exhausted, what zlib still holds is at most one window (32 KiB).
        return self._zlib.flush() if self._zlib is not None else b""


async def capped_body(response: httpx.Response, max_bytes: int) -> AsyncGenerator[bytes, None]:
    """The decoded body in pieces of at most 64 KiB; ``UrlFetchFailed`` once it passes ``max_bytes``.

    Only gzip and deflate are decoded (the client advertises nothing else), with zlib's
    ``max_length`` so a gzip bomb yields at most one piece past the cap; httpx's decoder would
    inflate each network chunk in full first.
    """
    declared_length = content_length(response)
    decoder = _BoundedDecoder(response.headers.get("content-encoding", ""))
    # Encoded bytes are capped too: a stream of empty deflate blocks decodes to nothing forever.
    raw_cap = max_bytes + max_bytes // 64 + 1024
    raw_total = decoded_total = 0
    async for chunk in response.aiter_raw():
        raw_total += len(chunk)
        if declared_length is not None and raw_total > declared_length:
            raise UrlFetchFailed("the body is longer than its Content-Length")
        if raw_total > raw_cap:
            raise UrlFetchFailed(f"the body exceeds {max_bytes} bytes")
        for piece in decoder.feed(chunk):
            decoded_total += len(piece)
            if decoded_total > max_bytes:
                raise UrlFetchFailed(f"the body exceeds {max_bytes} bytes")
            yield piece
    tail = decoder.flush()
    if decoded_total + len(tail) > max_bytes:
        raise UrlFetchFailed(f"the body exceeds {max_bytes} bytes")
    if tail:
        yield tail


def content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError as exc:
        raise UrlFetchFailed("malformed Content-Length") from exc
    if length < 0:
        raise UrlFetchFailed("malformed Content-Length")
    return length


def guarded_client(
    policy: UrlPolicy,
    *,
    purpose: Purpose,
    resolver: Resolver | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 15.0,
    total_timeout: float | None = 60.0,
    verify: ssl.SSLContext | bool = True,
    network_backend: httpcore.AsyncNetworkBackend | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    user_agent: str = "comfyfleet",
) -> httpx.AsyncClient:
    """The client to use for any URL a tenant supplied. Build one per policy (tenant allowlist).

    ``connect_timeout`` bounds DNS plus TCP/TLS setup, ``read_timeout`` each read, and
    ``total_timeout`` a whole ``send`` including redirects (for ``stream=True`` up to the headers;
    ``fetch_to_file`` has its own deadline covering the body). A non-streamed answer is read
    through ``capped_body`` and refused past ``max_body_bytes``; a caller that streams reads the
    body with ``capped_body`` too.
    """
    transport = GuardedTransport(policy, resolver=resolver, network_backend=network_backend, verify=verify)
    return GuardedAsyncClient(
        purpose=purpose,
        total_timeout=total_timeout,
        max_body_bytes=max_body_bytes,
        transport=transport,
        trust_env=False,  # no proxy, netrc or CA bundle from the environment
        follow_redirects=purpose == "media",
        cookies=_cookieless_jar(),
        # Only what capped_body can decode with a bound (httpx would also offer br / zstd).
        headers={"User-Agent": user_agent, "Accept-Encoding": "gzip, deflate"},
        timeout=httpx.Timeout(
            connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
        ),
    )
