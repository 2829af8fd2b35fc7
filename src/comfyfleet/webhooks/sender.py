"""The webhook sender: leases due deliveries from the outbox and POSTs them, signed, through the SSRF
guard.

One attempt: the destination URL is re-checked by the guarded client (no redirects, connect only to
vetted addresses), the body is rendered and signed with every valid secret of the endpoint, and the
whole exchange is bounded by ``settings.webhook_timeout_s``; at most 64 KiB of the answer is read.
2xx is delivered; 410 Gone disables the endpoint and parks its pending deliveries; anything else is
retried on ``retry.SCHEDULE`` (jittered, postponed by ``Retry-After``) and dead-lettered after the
last attempt. Every attempt is written to ``webhook_attempts``.

Isolation: deliveries are leased in batches that hold at most ``PER_TARGET`` deliveries per
destination and are filled round-robin across tenants (``repository.claim_due``); every leased
delivery is sent in its own task, all at once, each with its own deadline. A slow or dead endpoint
therefore costs at most ``PER_TARGET`` concurrent attempts of one timeout each, never a place in a
line that other tenants wait in. The long-running loop also skips destinations that still have
attempts in flight, so a hanging endpoint cannot accumulate more than ``PER_TARGET`` of them.

Time: ``now`` (a parameter, for tests and for scheduling) decides what is due and when to retry. The
``webhook-timestamp`` header is always the wall clock, because receivers compare it with theirs to
refuse replays.

Delivery is at least once: a sender that dies mid-attempt leaves a lease that expires after the
timeout plus a margin, and the delivery is tried again with the same ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import orjson

from comfyfleet.assets import repository as asset_repo
from comfyfleet.assets.schemas import output_body
from comfyfleet.jobs.schemas import job_urls
from comfyfleet.runtime import Runtime
from comfyfleet.security.guarded_http import guarded_client
from comfyfleet.security.ssrf import UrlFetchFailed, UrlNotAllowed
from comfyfleet.security.url_policy import url_policy
from comfyfleet.timeutil import isoformat, utcnow
from comfyfleet.webhooks import repository as repo
from comfyfleet.webhooks import retry
from comfyfleet.webhooks.outbox import TERMINAL_EVENTS
from comfyfleet.webhooks.repository import DeliveryRow, EndpointRow
from comfyfleet.webhooks.secrets import SecretUnreadable, decrypt_secret, signature_header
from comfyfleet.webhooks.service import job_url_secret_id

log = logging.getLogger(__name__)

PER_TARGET = 4  # concurrent attempts per destination (endpoint, or tenant + per-job URL)
MAX_IN_FLIGHT = 256  # concurrent attempts per sender process
POLL_S = 1.0  # the outbox is polled; the first retry is 5 s away anyway
LEASE_MARGIN = timedelta(seconds=60)  # beyond the attempt timeout, for rendering and bookkeeping
RESPONSE_READ_LIMIT = 64 * 1024
EXCERPT_STORED = 1024  # of what was read, what the attempt log keeps
SHUTDOWN_GRACE_S = 5.0
PURGE_AFTER = timedelta(days=30)
PURGE_EVERY_S = 3600.0
_TERMINAL = frozenset(TERMINAL_EVENTS.values())


@dataclass(frozen=True)
class _Work:
    delivery: DeliveryRow
    token: str
    url: str | None  # None: the endpoint is gone or disabled
    signer: EndpointRow | None  # the row whose secrets sign this delivery
    allowlist: tuple[str, ...]


@dataclass(frozen=True)
class _Result:
    status_code: int | None
    error: str | None
    excerpt: bytes | None
    duration_ms: int
    retry_after: timedelta | None = None


class Sender:
    """Leases and sends deliveries. One per process for ``run_sender``; one per call of
    ``deliver_due``. Keeps one guarded client per tenant allowlist, reused across attempts."""

    def __init__(self, runtime: Runtime, name: str | None = None) -> None:
        self.runtime = runtime
        # locked_by holds "<name>:<12 hex>" in 128 characters; host names can be longer than that.
        self.name = (name or f"{socket.gethostname()[:64]}-{os.getpid()}-{uuid.uuid4().hex[:6]}")[:100]
        self._clients: dict[tuple[str, ...], httpx.AsyncClient] = {}
        self._busy: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    # ------------------------------------------------------------ leasing

    async def claim(self, *, now: datetime, limit: int) -> list[_Work]:
        settings = self.runtime.settings
        token = f"{self.name}:{uuid.uuid4().hex[:12]}"
        lease = timedelta(seconds=settings.webhook_timeout_s) + LEASE_MARGIN
        async with self.runtime.engine.begin() as conn:
            deliveries = await repo.claim_due(
                conn,
                now=now,
                token=token,
                lease=lease,
                limit=limit,
                per_target=PER_TARGET,
                busy_targets=list(self._busy),
            )
            signer_ids = {d.endpoint_id or job_url_secret_id(d.tenant_id) for d in deliveries}
            signers = await repo.endpoints_by_id(conn, signer_ids)
            allowlists = await repo.tenant_allowlists(conn, {d.tenant_id for d in deliveries})
        work: list[_Work] = []
        for d in deliveries:
            signer = signers.get(d.endpoint_id or job_url_secret_id(d.tenant_id))
            if signer is not None and signer.tenant_id != d.tenant_id:
                signer = None  # never sign one tenant's event with another's secret
            if d.endpoint_id is not None:
                url = signer.url if signer is not None and signer.enabled else None
            else:
                url = d.url
            work.append(_Work(d, token, url, signer, tuple(sorted(allowlists.get(d.tenant_id) or ()))))
        return work

    # ------------------------------------------------------------ one pass / the loop

    async def run_pass(self, *, now: datetime, limit: int) -> int:
        """Lease what is due and send it all concurrently; return when every attempt has settled."""
        work = await self.claim(now=now, limit=limit)
        outcomes = await asyncio.gather(*(self._deliver(w, now) for w in work), return_exceptions=True)
        for w, outcome in zip(work, outcomes, strict=True):
            if isinstance(outcome, Exception):  # recording failed; the lease expires and it is retried
                log.error("webhook delivery %s: %r", w.delivery.id, outcome)
        return len(work)

    async def spawn_due(self) -> int:
        """Lease what is due and start sending it without waiting (the long-running loop)."""
        room = MAX_IN_FLIGHT - len(self._tasks)
        if room <= 0:
            return 0
        work = await self.claim(now=utcnow(), limit=room)
        for w in work:
            target = w.delivery.target
            self._busy[target] = self._busy.get(target, 0) + 1
            task = asyncio.create_task(self._deliver(w, None), name=f"webhook-{w.delivery.id}")
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._settled, target))
        return len(work)

    def _settled(self, target: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        left = self._busy.get(target, 1) - 1
        if left > 0:
            self._busy[target] = left
        else:
            self._busy.pop(target, None)
            self.wake.set()  # the destination is free again: its next deliveries may be due
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery task %s: %r", task.get_name(), task.exception())

    async def aclose(self, *, grace_s: float = 0.0) -> None:
        if self._tasks:
            # In-flight attempts get a moment to finish; the rest keep their lease, which expires and
            # makes them due again (at least once, same webhook-id).
            _done, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    # ------------------------------------------------------------ one attempt

    async def _deliver(self, work: _Work, now: datetime | None) -> None:
        delivery = work.delivery
        if work.url is None:
            # The endpoint was disabled or deleted after the event: park, do not count an attempt.
            async with self.runtime.engine.begin() as conn:
                await repo.finish_attempt(
                    conn, delivery.id, token=work.token, values={"status": repo.DISABLED}
                )
            return
        try:
            result = await self._attempt(work, now or utcnow())
        except Exception as exc:  # one bad delivery must not take the sender down
            log.exception("webhook delivery %s failed unexpectedly", delivery.id)
            result = _Result(
                status_code=None, error=f"internal error ({type(exc).__name__})", excerpt=None, duration_ms=0
            )
        await self._record(work, result, now or utcnow())

    async def _attempt(self, work: _Work, now: datetime) -> _Result:
        assert work.url is not None
        delivery, settings = work.delivery, self.runtime.settings
        try:
            keys = signing_secrets(self.runtime, work.signer, now)
        except SecretUnreadable as exc:
            return _Result(status_code=None, error=str(exc), excerpt=None, duration_ms=0)
        if not keys:
            return _Result(
                status_code=None,
                error="no signing secret: create the job URL secret",
                excerpt=None,
                duration_ms=0,
            )
        timeout = settings.webhook_timeout_s
        started = time.monotonic()
        status: int | None = None
        retry_after: timedelta | None = None
        excerpt: bytes | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(timeout):
                body = await self._render(delivery)
                sent_at = utcnow()  # wall clock: receivers check it against theirs
                headers = {
                    "content-type": "application/json",
                    "webhook-id": delivery.id,
                    "webhook-timestamp": str(int(sent_at.timestamp())),
                    "webhook-signature": signature_header(
                        keys, msg_id=delivery.id, timestamp=sent_at, body=body
                    ),
                }
                client = self._client(work.allowlist)
                request = client.build_request("POST", work.url, content=body, headers=headers)
                response = await client.send(request, stream=True)
                status = response.status_code
                retry_after = retry.parse_retry_after(response.headers.get("retry-after"), now)
                try:
                    excerpt = await _read_limited(response, RESPONSE_READ_LIMIT)
                finally:
                    await response.aclose()
        except TimeoutError:
            if status is None:
                error = f"no answer within {timeout:g} s"
        except (UrlNotAllowed, UrlFetchFailed) as exc:
            error = exc.message
        except httpx.InvalidURL:
            error = "the URL is not valid"
        except httpx.HTTPError as exc:
            error = f"request failed ({type(exc).__name__})"
        duration_ms = int((time.monotonic() - started) * 1000)
        return _Result(status, error, excerpt[:EXCERPT_STORED] if excerpt else None, duration_ms, retry_after)

    async def _render(self, delivery: DeliveryRow) -> bytes:
        """The stored event with what must be fresh per attempt: job URLs and signed output URLs."""
        settings = self.runtime.settings
        payload: dict[str, Any] = dict(delivery.payload)
        data: dict[str, Any] = dict(payload.get("data") or {})
        if delivery.job_id is not None:
            data["urls"] = job_urls((settings.public_base_url or "").rstrip("/"), delivery.job_id)
            if delivery.event_type in _TERMINAL:
                async with self.runtime.engine.connect() as conn:
                    assets = await asset_repo.outputs_for_job(conn, delivery.tenant_id, delivery.job_id)
                data["outputs"] = [
                    await output_body(a, storage=self.runtime.storage, lifetime_s=settings.url_lifetime_s)
                    for a in assets
                ]
        payload["data"] = data
        return orjson.dumps(payload)

    def _client(self, allowlist: tuple[str, ...]) -> httpx.AsyncClient:
        client = self._clients.get(allowlist)
        if client is None:
            settings = self.runtime.settings
            timeout = settings.webhook_timeout_s
            client = guarded_client(
                url_policy(settings, list(allowlist)),
                purpose="webhook",
                connect_timeout=min(5.0, timeout),
                read_timeout=timeout,
                total_timeout=timeout,
                user_agent="comfyfleet-webhooks",
            )
            self._clients[allowlist] = client
        return client

    async def _record(self, work: _Work, result: _Result, now: datetime) -> None:
        delivery = work.delivery
        attempts = delivery.attempts + 1
        status = result.status_code
        gone = status == 410
        values: dict[str, Any] = {"attempts": attempts}
        if status is not None and 200 <= status < 300:
            values.update(status=repo.DELIVERED, delivered_at=now)
        elif gone:
            values.update(status=repo.DISABLED)
        else:
            retry_at = retry.next_attempt_at(now, attempts, result.retry_after)
            if retry_at is None:
                values.update(status=repo.DEAD)
            else:
                values.update(status=repo.PENDING, next_attempt_at=retry_at)
        async with self.runtime.engine.begin() as conn:
            if gone and delivery.endpoint_id is not None:
                # The endpoint row first: concurrent 410s of one endpoint then queue behind each other
                # instead of each holding its own delivery while waiting for the other's (deadlock).
                reason = f"the endpoint answered 410 Gone at {isoformat(now)}"
                await repo.disable_endpoint(
                    conn, delivery.tenant_id, delivery.endpoint_id, reason=reason, now=now
                )
            if not await repo.finish_attempt(conn, delivery.id, token=work.token, values=values):
                # Deleted with its endpoint, or the lease ran out and another sender took over.
                log.warning("webhook delivery %s: lease lost, outcome not recorded", delivery.id)
                return
            await repo.insert_attempt(
                conn,
                {
                    "delivery_id": delivery.id,
                    "tenant_id": delivery.tenant_id,
                    "attempted_at": now,
                    "status_code": status,
                    "error": result.error,
                    "response_excerpt": result.excerpt,
                    "duration_ms": result.duration_ms,
                },
            )
        if values["status"] == repo.DEAD:
            log.warning("webhook delivery %s dead-lettered after %d attempts", delivery.id, attempts)


def signing_secrets(runtime: Runtime, signer: EndpointRow | None, now: datetime) -> list[str]:
    """The secrets that sign now: the current one, plus the previous one during its overlap."""
    if signer is None:
        return []
    settings = runtime.settings
    keys = [decrypt_secret(settings, signer.secret, row_id=signer.id)]
    expires = signer.previous_secret_expires_at
    if signer.previous_secret and expires is not None and expires > now:
        keys.append(decrypt_secret(settings, signer.previous_secret, row_id=signer.id))
    return keys


async def _read_limited(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of the answer, as sent (not decompressed: it is only kept for the log).
    A body that breaks off does not undo the status line we already have."""
    chunks: list[bytes] = []
    size = 0
    with contextlib.suppress(httpx.HTTPError):
        async for chunk in response.aiter_raw():
            chunks.append(chunk[: limit - size])
            size += len(chunk)
            if size >= limit:
                break
    return b"".join(chunks)


async def deliver_due(runtime: Runtime, *, now: datetime | None = None, limit: int = 100) -> int:
    """One pass: lease up to ``limit`` due deliveries, send them concurrently, record the outcomes.
    Returns how many were attempted (or parked because their endpoint is off)."""
    sender = Sender(runtime)
    try:
        return await sender.run_pass(now=now or utcnow(), limit=limit)
    finally:
        await sender.aclose()


async def run_sender(runtime: Runtime, stop: asyncio.Event) -> None:
    """Deliver until ``stop`` is set: poll the outbox, start attempts without waiting for earlier ones.
    The loop wakes every ``POLL_S``, when a destination's attempts settle, and on ``stop``."""
    sender = Sender(runtime)
    last_purge = float("-inf")
    forward = asyncio.create_task(_set_on(stop, sender.wake))
    try:
        while not stop.is_set():
            sender.wake.clear()
            started = 0
            try:
                started = await sender.spawn_due()
                if time.monotonic() - last_purge > PURGE_EVERY_S:
                    last_purge = time.monotonic()
                    async with runtime.engine.begin() as conn:
                        await repo.purge_finished(conn, before=utcnow() - PURGE_AFTER)
            except Exception:
                log.exception("webhook sender pass failed; retrying")
            if started and sender.in_flight < MAX_IN_FLIGHT:
                await asyncio.sleep(0)  # more may be due right away; let the started attempts begin
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sender.wake.wait(), POLL_S)
    finally:
        forward.cancel()
        await sender.aclose(grace_s=SHUTDOWN_GRACE_S)


async def _set_on(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()
