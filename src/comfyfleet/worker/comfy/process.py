"""One ComfyUI: ``ComfyProcess`` is a process this host starts, watches and restarts (with ``Backoff``
between restarts); ``AttachedComfy`` is a ComfyUI something else runs, only watched. Both probe
``/system_stats`` for health and report a ``SlotStatus``.

``ComfyProcess`` runs ComfyUI in its own process group, so stopping it also reaches whatever ComfyUI or
a custom node forked. When it dies, its watchdog restarts it after a back-off, or hands the death to
``on_death`` (the supervisor uses that to restart all slots of an MPS GPU together).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import httpx

from comfyfleet.worker.comfy.slots import (
    SlotLostCallback,
    SlotSpec,
    SlotState,
    SlotStatus,
    notify_slot_lost,
)

log = logging.getLogger(__name__)

DeathHandler = Callable[["ComfyProcess", int], Awaitable[None]]

_READY_POLL = 0.1
_LOG_TAIL_LINES = 20


class ComfyStartError(RuntimeError):
    """A ComfyUI process did not come up: it exited, or it did not answer in time."""


@dataclass
class Backoff:
    """Exponential delay between restarts; a process that stayed up ``stable_after`` s starts over."""

    base: float = 1.0
    cap: float = 30.0
    stable_after: float = 60.0
    _failures: int = field(default=0, init=False, repr=False)

    def next_delay(self, uptime: float | None) -> float:
        if uptime is not None and uptime >= self.stable_after:
            self._failures = 0
        delay = min(self.cap, self.base * 2.0**self._failures)
        self._failures += 1
        return delay


# ------------------------------------------------------------------------------------ health probing


class _Monitored:
    """The part a started and an attached ComfyUI share: a URL, a health probe and a state."""

    def __init__(self, url: str, *, health_timeout: float, unhealthy_after: int) -> None:
        self._url = url
        self._health_timeout = health_timeout
        self._unhealthy_after = max(1, unhealthy_after)
        self._client: httpx.AsyncClient | None = None
        self._state: SlotState = "stopped"
        self._failed_probes = 0
        self.last_error: str | None = None

    @property
    def url(self) -> str:
        return self._url

    async def healthy(self) -> bool:
        """True when ``/system_stats`` answers 200 within the health timeout."""
        try:
            response = await self._http().get("/system_stats")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # trust_env=False: a proxy configured for the outside world must not sit between the
            # worker and a ComfyUI on loopback.
            self._client = httpx.AsyncClient(
                base_url=self._url, timeout=self._health_timeout, trust_env=False
            )
        return self._client

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _record_probe(self, ok: bool) -> None:
        # Only flips between ready and unhealthy; starting/restarting belong to the lifecycle code.
        if ok:
            self._failed_probes = 0
            if self._state == "unhealthy":
                log.info("ComfyUI at %s answers again", self._url)
                self._state = "ready"
            return
        self._failed_probes += 1
        if self._state == "ready" and self._failed_probes >= self._unhealthy_after:
            log.warning("ComfyUI at %s stopped answering /system_stats", self._url)
            self.last_error = f"no answer from /system_stats ({self._failed_probes} probes)"
            self._state = "unhealthy"


# ----------------------------------------------------------------------------------- started process


class ComfyProcess(_Monitored):
    """One ComfyUI process this host starts, watches and restarts."""

    def __init__(
        self,
        spec: SlotSpec,
        *,
        install_dir: str | Path,
        python: str = sys.executable,
        startup_timeout: float = 180.0,
        stop_grace: float = 10.0,
        health_interval: float = 5.0,
        health_timeout: float = 2.0,
        unhealthy_after: int = 3,
        backoff: Backoff | None = None,
        on_lost: SlotLostCallback | None = None,
        on_death: DeathHandler | None = None,
    ) -> None:
        super().__init__(spec.url, health_timeout=health_timeout, unhealthy_after=unhealthy_after)
        self.spec = spec
        self.restarts = 0
        self.generation = 0  # counts spawns, so a late death report can tell it is stale
        self.last_uptime: float | None = None
        self._install_dir = Path(install_dir).absolute()
        self._python = python
        self._startup_timeout = startup_timeout
        self._stop_grace = stop_grace
        self._health_interval = health_interval
        self._backoff = backoff or Backoff()
        self._on_lost = on_lost
        self._on_death = on_death
        self._proc: asyncio.subprocess.Process | None = None
        self._started_at: float | None = None
        self._lost_reported = False
        # Held while the process is being spawned or stopped, so the watchdog leaves it alone.
        self._lock = asyncio.Lock()
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def status(self) -> SlotStatus:
        return SlotStatus(
            index=self.spec.index,
            gpu=self.spec.gpu,
            url=self.url,
            state=self._state,
            pid=self.pid,
            restarts=self.restarts,
            last_error=self.last_error,
        )

    def update_env(self, changes: Mapping[str, str | None]) -> None:
        """Change the environment of later (re)starts; ``None`` removes a variable."""
        env = dict(self.spec.env)
        for name, value in changes.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        self.spec = replace(self.spec, env=env)

    async def start(self) -> None:
        """Spawn ComfyUI, wait until it answers, then keep watching it; no-op while it runs."""
        async with self._lock:
            if self.pid is None:
                await self._launch()
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch(), name=f"comfy-watchdog-{self.spec.index}")

    async def stop(self) -> None:
        task, self._watchdog = self._watchdog, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        async with self._lock:
            await self._terminate()
        self._state = "stopped"
        await self._close_client()

    async def restart(self) -> bool:
        """Stop and start again; raises ``ComfyStartError`` when the new process does not come up."""
        async with self._lock:
            await self._relaunch()
        return True

    async def hold(self) -> None:
        """Stop the process and keep the watchdog off it until ``release()`` (used by restart_gpu)."""
        await self._lock.acquire()
        try:
            await self._terminate()
            self._state = "restarting"
        except BaseException:
            self._lock.release()
            raise

    async def release(self, *, start: bool = True) -> None:
        """Start the process stopped by ``hold()`` (or leave it to the watchdog with start=False)."""
        try:
            if start:
                await self._relaunch()
        finally:
            self._lock.release()

    # -- lifecycle, always under self._lock

    async def _relaunch(self) -> None:
        await self._terminate()
        self.restarts += 1
        await self._launch()

    async def _launch(self) -> None:
        self._state = "starting"
        proc = await self._spawn()
        self._proc = proc
        self.generation += 1
        try:
            await self._wait_ready(proc)
        except BaseException as exc:  # cancelled too: never leave a half-started process behind
            await self._terminate()
            self._state = "failed"
            if isinstance(exc, ComfyStartError):
                self.last_error = str(exc)
            raise
        self._state = "ready"
        self._failed_probes = 0
        self._started_at = time.monotonic()
        self._lost_reported = False
        log.info("ComfyUI slot %d ready at %s (pid %d)", self.spec.index, self.url, proc.pid)

    async def _spawn(self) -> asyncio.subprocess.Process:
        spec = self.spec
        spec.create_dirs()
        argv = spec.argv(self._python, self._install_dir)
        logfile = _open_log(spec.log_path, f"comfyfleet: starting slot {spec.index}: {' '.join(argv)}")
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                cwd=str(self._install_dir),
                env={**inherited_env(), **spec.env},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=asyncio.subprocess.STDOUT,
                # Its own process group, so stop() can reach whatever ComfyUI or a custom node forks.
                start_new_session=True,
            )
        finally:
            logfile.close()

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout
        while True:
            if proc.returncode is not None:
                raise ComfyStartError(
                    f"ComfyUI slot {self.spec.index} exited with code {proc.returncode} during start-up; "
                    f"last lines of {self.spec.log_path}:\n{log_tail(self.spec.log_path)}"
                )
            if await self.healthy():
                return
            if loop.time() >= deadline:
                raise ComfyStartError(
                    f"ComfyUI slot {self.spec.index} did not answer {self.url}/system_stats within "
                    f"{self._startup_timeout:g} s; last lines of {self.spec.log_path}:\n"
                    f"{log_tail(self.spec.log_path)}"
                )
            # Wakes up at once if the process exits meanwhile.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), _READY_POLL)

    async def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        group = proc.pid  # start_new_session made it the leader of a group with its own id
        if proc.returncode is None:
            # ComfyUI ignores SIGINT when it runs in the background, so SIGTERM. SIGCONT because a
            # stopped (SIGSTOP) process only acts on SIGTERM once it runs again.
            _signal_group(group, signal.SIGTERM)
            _signal_group(group, signal.SIGCONT)
            try:
                await asyncio.wait_for(proc.wait(), self._stop_grace)
            except TimeoutError:
                log.warning("ComfyUI slot %d ignored SIGTERM for %g s", self.spec.index, self._stop_grace)
        # Children that outlive ComfyUI would keep GPU memory or the port: kill the whole group.
        _signal_group(group, signal.SIGKILL)
        await proc.wait()

    # -- watchdog

    async def _watch(self) -> None:
        while True:
            try:
                await self._watch_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("watchdog of ComfyUI slot %d failed; it carries on", self.spec.index)
                await asyncio.sleep(self._health_interval)

    async def _watch_once(self) -> None:
        if self._lock.locked():  # a start, stop or restart is under way elsewhere
            await asyncio.sleep(self._health_interval)
            return
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), self._health_interval)
            if proc.returncode is None:
                ok = await self.healthy()
                if proc is self._proc and not self._lock.locked():
                    self._record_probe(ok)
                return
        if self._lock.locked() or proc is not self._proc:
            return
        await self._died(self.generation)

    async def _died(self, generation: int) -> None:
        proc = self._proc
        # None after a failed start, so a crash loop keeps backing off instead of starting over.
        self.last_uptime = time.monotonic() - self._started_at if self._started_at is not None else None
        self._started_at = None
        if proc is not None:
            self.last_error = f"ComfyUI exited with code {proc.returncode}"
            log.warning("ComfyUI slot %d died (code %s)", self.spec.index, proc.returncode)
        self._state = "restarting"
        if self._on_death is not None:
            await self._on_death(self, generation)
            return
        if not self._lost_reported:
            self._lost_reported = True
            await notify_slot_lost(self._on_lost, self.spec)
        await asyncio.sleep(self._backoff.next_delay(self.last_uptime))
        async with self._lock:
            if generation != self.generation:
                return  # someone restarted it meanwhile
            try:
                await self._relaunch()
            except ComfyStartError as exc:
                log.error("restarting ComfyUI slot %d failed: %s", self.spec.index, exc)


# ---------------------------------------------------------------------------------- attached ComfyUI


class AttachedComfy(_Monitored):
    """A ComfyUI something else runs: watched, never started, stopped or restarted."""

    def __init__(
        self,
        url: str,
        *,
        startup_timeout: float = 60.0,
        health_interval: float = 5.0,
        health_timeout: float = 2.0,
        unhealthy_after: int = 3,
    ) -> None:
        super().__init__(url.rstrip("/"), health_timeout=health_timeout, unhealthy_after=unhealthy_after)
        self._startup_timeout = startup_timeout
        self._health_interval = health_interval
        self._watchdog: asyncio.Task[None] | None = None

    def status(self) -> SlotStatus:
        return SlotStatus(
            index=0,
            gpu=None,
            url=self.url,
            state=self._state,
            pid=None,
            restarts=0,
            last_error=self.last_error,
        )

    async def start(self) -> None:
        """Wait until the ComfyUI answers, then keep probing it."""
        self._state = "starting"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout
        while not await self.healthy():
            if loop.time() >= deadline:
                self._state = "failed"
                self.last_error = f"no answer from {self.url}/system_stats within {self._startup_timeout:g} s"
                raise ComfyStartError(self.last_error)
            await asyncio.sleep(_READY_POLL)
        self._state = "ready"
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch(), name="comfy-watchdog-attached")

    async def stop(self) -> None:
        task, self._watchdog = self._watchdog, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        self._state = "stopped"
        await self._close_client()

    async def restart(self) -> bool:
        log.warning("cannot restart the ComfyUI at %s: this host did not start it", self.url)
        return False

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval)
            self._record_probe(await self.healthy())


# ----------------------------------------------------------------------------------------- helpers


def _signal_group(group: int, signum: signal.Signals) -> None:
    # The group is gone once its last member is reaped; nothing left to signal then.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


def _open_log(path: Path, header: str) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    logfile = path.open("ab")
    logfile.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {header}\n".encode())
    logfile.flush()
    return logfile


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def inherited_env() -> dict[str, str]:
    """The environment a ComfyUI slot inherits: ours minus every ``COMFYFLEET_*`` variable. Our
    secrets (database URL, key pepper, storage keys) arrive that way, and ComfyUI and its third-party
    custom nodes have no use for them. A slot's own settings come back through ``SlotSpec.env``."""
    return {name: value for name, value in os.environ.items() if not name.startswith("COMFYFLEET_")}
