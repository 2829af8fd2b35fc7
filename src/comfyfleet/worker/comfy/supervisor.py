"""Start, watch and stop the ComfyUI processes of one worker host.

A host runs one ComfyUI process per *slot*: ``slots_per_gpu`` slots per GPU, or CPU-only slots. Every
slot has its own port and its own input/output/temp/user folders, and its own SQLite database
(``--database-url``), because ComfyUI 0.8.0 otherwise puts the database of every process started from
one install at the same path inside that install.

With several slots on one GPU, an NVIDIA MPS control daemon per GPU lets their kernels share the GPU
instead of time-slicing it. MPS is optional and best effort: when the binary is missing or the daemon
does not come up, the supervisor runs plain slots and records why (``mode`` / ``mode_reason``, shown by
``/readyz``). Under MPS a fatal GPU fault in one client takes down every client of that GPU's server, so
the death of one slot restarts all slots of its GPU together (``restart_gpu``), and ``on_slot_lost``
tells the worker which slots lost their jobs.

``Supervisor`` can also drive a ComfyUI that something else started (``url=``); then nothing is
started or restarted, only watched.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Literal, Protocol

import httpx

log = logging.getLogger(__name__)

SlotState = Literal["stopped", "starting", "ready", "unhealthy", "restarting", "failed"]
SupervisorMode = Literal["mps", "plain", "attached"]
SlotLostCallback = Callable[["SlotSpec"], Awaitable[None] | None]
DeathHandler = Callable[["ComfyProcess", int], Awaitable[None]]

LISTEN_HOST = "127.0.0.1"
MPS_CONTROL = "nvidia-cuda-mps-control"
NVIDIA_SMI = "nvidia-smi"
# Several ComfyUI processes share the host's cores; without this each one sizes its CPU thread pools
# for the whole machine and they oversubscribe it.
DEFAULT_THREAD_ENV: Mapping[str, str] = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_READY_POLL = 0.1
_LOG_TAIL_LINES = 20


class ComfyStartError(RuntimeError):
    """A ComfyUI process did not come up: it exited, or it did not answer in time."""


class MpsUnavailable(RuntimeError):
    """The MPS control daemon could not be started; the supervisor falls back to plain slots."""


# --------------------------------------------------------------------------------------------- slots


@dataclass(frozen=True)
class SlotSpec:
    """Everything that makes one ComfyUI process different from its neighbours."""

    index: int
    gpu: int | None
    port: int
    base_dir: Path
    env: Mapping[str, str] = field(default_factory=dict, hash=False)
    extra_args: tuple[str, ...] = ()

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def temp_dir(self) -> Path:
        return self.base_dir / "temp"

    @property
    def user_dir(self) -> Path:
        return self.base_dir / "user"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.user_dir / 'comfyui.db'}"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "comfyui.log"

    @property
    def url(self) -> str:
        return f"http://{LISTEN_HOST}:{self.port}"

    def argv(self, python: str, install_dir: Path) -> list[str]:
        return [
            python,
            str(install_dir / "main.py"),
            "--listen",
            LISTEN_HOST,
            "--port",
            str(self.port),
            "--input-directory",
            str(self.input_dir),
            "--output-directory",
            str(self.output_dir),
            "--temp-directory",
            str(self.temp_dir),
            "--user-directory",
            str(self.user_dir),
            "--database-url",
            self.database_url,
            "--disable-auto-launch",
            *self.extra_args,
        ]

    def create_dirs(self) -> None:
        for folder in (self.input_dir, self.output_dir, self.temp_dir, self.user_dir):
            folder.mkdir(parents=True, exist_ok=True)


def build_slots(
    *,
    base_dir: str | Path,
    base_port: int,
    gpus: Sequence[int] | None,
    slots_per_gpu: int = 1,
    cpu_slots: int = 1,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    mps: Mapping[int, MpsDaemon] | None = None,
) -> list[SlotSpec]:
    """One slot per GPU x ``slots_per_gpu``, or ``cpu_slots`` slots without GPUs; ports count up."""
    if slots_per_gpu < 1 or cpu_slots < 1:
        raise ValueError("slots_per_gpu and cpu_slots must be at least 1")
    if gpus and len(set(gpus)) != len(gpus):
        raise ValueError(f"a GPU is listed twice: {list(gpus)}")
    devices: list[int | None] = (
        [gpu for gpu in gpus for _ in range(slots_per_gpu)] if gpus else [None] * cpu_slots
    )
    root = Path(base_dir).absolute()
    return [
        SlotSpec(
            index=index,
            gpu=gpu,
            port=base_port + index,
            base_dir=root / f"slot-{index}",
            env=_slot_env(gpu, env or {}, (mps or {}).get(gpu) if gpu is not None else None),
            extra_args=tuple(extra_args),
        )
        for index, gpu in enumerate(devices)
    ]


def _slot_env(gpu: int | None, base: Mapping[str, str], daemon: MpsDaemon | None) -> dict[str, str]:
    env = {**DEFAULT_THREAD_ENV, **base}
    if daemon is not None:
        env.update(daemon.client_env())
    elif gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


@dataclass(frozen=True)
class SlotStatus:
    index: int
    gpu: int | None
    url: str
    state: SlotState
    pid: int | None
    restarts: int
    last_error: str | None

    @property
    def ready(self) -> bool:
        return self.state == "ready"


@dataclass(frozen=True)
class SupervisorStatus:
    mode: SupervisorMode
    mode_reason: str
    slots: tuple[SlotStatus, ...]

    @property
    def ready(self) -> bool:
        return bool(self.slots) and all(slot.ready for slot in self.slots)


class ComfyInstance(Protocol):
    """What the worker needs from a ComfyUI, whether this host started it or not."""

    @property
    def url(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def restart(self) -> bool: ...

    async def healthy(self) -> bool: ...

    def status(self) -> SlotStatus: ...


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
                env={**os.environ, **spec.env},
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
                    f"last lines of {self.spec.log_path}:\n{_tail(self.spec.log_path)}"
                )
            if await self.healthy():
                return
            if loop.time() >= deadline:
                raise ComfyStartError(
                    f"ComfyUI slot {self.spec.index} did not answer {self.url}/system_stats within "
                    f"{self._startup_timeout:g} s; last lines of {self.spec.log_path}:\n"
                    f"{_tail(self.spec.log_path)}"
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


# --------------------------------------------------------------------------------------------- MPS


class MpsDaemon:
    """The NVIDIA MPS control daemon of one GPU, with its own pipe and log folders."""

    def __init__(
        self,
        gpu: int,
        root: Path,
        *,
        control: str = MPS_CONTROL,
        nvidia_smi: str = NVIDIA_SMI,
        timeout: float = 15.0,
    ) -> None:
        self.gpu = gpu
        self.pipe_dir = root / f"gpu{gpu}" / "pipe"
        self.log_dir = root / f"gpu{gpu}" / "log"
        # The daemon remaps the devices it sees, so a client's CUDA_VISIBLE_DEVICES index would be
        # read against the remapped list; a GPU UUID means the same device to both (NVIDIA's advice).
        self.device = str(gpu)
        self._control = control
        self._nvidia_smi = nvidia_smi
        self._timeout = timeout

    def client_env(self) -> dict[str, str]:
        return {
            "CUDA_VISIBLE_DEVICES": self.device,
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir),
        }

    async def start(self) -> None:
        control = shutil.which(self._control)
        if control is None:
            raise MpsUnavailable(f"{self._control} not found")
        self.device = await self._gpu_uuid()
        self.pipe_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # -d forks the daemon; its output goes to a file because a pipe it inherits would stay open.
        code, output = await _run(
            [control, "-d"],
            env=self._env(),
            timeout=self._timeout,
            output_file=self.log_dir / "control-start.out",
        )
        if code != 0:
            raise MpsUnavailable(f"`{self._control} -d` for GPU {self.gpu} exited with {code}: {output}")
        code, output = await _run(
            [control], env=self._env(), stdin=b"get_server_list\n", timeout=self._timeout
        )
        if code != 0:
            raise MpsUnavailable(f"MPS control daemon for GPU {self.gpu} does not answer: {output}")
        log.info("MPS control daemon running for GPU %d (%s)", self.gpu, self.device)

    async def stop(self) -> None:
        control = shutil.which(self._control)
        if control is None:
            return
        code, output = await _run([control], env=self._env(), stdin=b"quit\n", timeout=self._timeout)
        if code != 0:
            log.warning("stopping the MPS control daemon of GPU %d: %s", self.gpu, output)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.client_env()}

    async def _gpu_uuid(self) -> str:
        smi = shutil.which(self._nvidia_smi)
        if smi is None:
            raise MpsUnavailable(f"{self._nvidia_smi} not found (needed to name GPU {self.gpu} by UUID)")
        code, output = await _run(
            [smi, "--query-gpu=uuid", "--format=csv,noheader", "-i", str(self.gpu)],
            env=dict(os.environ),
            timeout=self._timeout,
        )
        uuid = output.strip().splitlines()[0].strip() if output.strip() else ""
        if code != 0 or not uuid.startswith(("GPU-", "MIG-")):
            raise MpsUnavailable(f"cannot read the UUID of GPU {self.gpu}: {output.strip() or code}")
        return uuid


# -------------------------------------------------------------------------------------- supervisor


class Supervisor:
    """All ComfyUI slots of this host: starts them, restarts them, reports their state."""

    def __init__(
        self,
        install_dir: str | Path | None = None,
        url: str | None = None,
        *,
        slots_per_gpu: int = 1,
        gpus: Sequence[int] | None = None,
        cpu_slots: int = 1,
        base_dir: str | Path | None = None,
        base_port: int = 8188,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        use_mps: bool = False,
        python: str = sys.executable,
        startup_timeout: float = 180.0,
        stop_grace: float = 10.0,
        health_interval: float = 5.0,
        health_timeout: float = 2.0,
        unhealthy_after: int = 3,
        restart_backoff: float = 1.0,
        restart_backoff_max: float = 30.0,
        on_slot_lost: SlotLostCallback | None = None,
        mps_control: str = MPS_CONTROL,
        nvidia_smi: str = NVIDIA_SMI,
        mps_root: str | Path | None = None,
    ) -> None:
        if (install_dir is None) == (url is None):
            raise ValueError("give exactly one of install_dir (start ComfyUI) or url (attach to one)")
        if install_dir is not None and base_dir is None:
            raise ValueError("base_dir is needed to give each slot its own folders")
        self.on_slot_lost = on_slot_lost
        self.mode: SupervisorMode = "attached" if url is not None else "plain"
        self.mode_reason = f"ComfyUI at {url} is run by something else" if url else "not started"
        self._url = url
        self._install_dir = Path(install_dir) if install_dir is not None else None
        self._base_dir = Path(base_dir).absolute() if base_dir is not None else None
        self._base_port = base_port
        self._gpus = list(gpus or [])
        self._slots_per_gpu = slots_per_gpu
        self._cpu_slots = cpu_slots
        self._env = dict(env or {})
        self._extra_args = tuple(extra_args)
        self._use_mps = use_mps
        self._python = python
        self._timeouts = (startup_timeout, stop_grace, health_interval, health_timeout)
        self._unhealthy_after = unhealthy_after
        self._backoff = (restart_backoff, restart_backoff_max)
        self._mps_control = mps_control
        self._nvidia_smi = nvidia_smi
        self._mps_root = Path(mps_root) if mps_root is not None else None
        self._daemons: dict[int, MpsDaemon] = {}
        self._gpu_locks: dict[int | None, asyncio.Lock] = {}
        self._gpu_backoff: dict[int | None, Backoff] = {}
        self._processes: list[ComfyProcess] = []
        self.instances: list[ComfyInstance] = []
        # Validate the layout now, so a bad configuration fails before anything starts.
        self.slots: list[SlotSpec] = self._build_slots() if install_dir is not None else []

    async def start(self) -> None:
        """Start every slot (MPS daemons first when asked for); on any failure stop all and raise."""
        if self._url is not None:
            startup, _, interval, timeout = self._timeouts
            attached = AttachedComfy(
                self._url,
                startup_timeout=startup,
                health_interval=interval,
                health_timeout=timeout,
                unhealthy_after=self._unhealthy_after,
            )
            self.instances = [attached]
            await attached.start()
            return
        await self._start_mps()
        self.slots = self._build_slots()
        self._processes = [self._make_process(spec) for spec in self.slots]
        self.instances = list(self._processes)
        results = await asyncio.gather(*(p.start() for p in self._processes), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()
            for error in errors:
                if not isinstance(error, Exception):
                    raise error  # cancellation and the like win over start-up errors
            raise ComfyStartError("; ".join(str(e) for e in errors)) from errors[0]

    async def stop(self) -> None:
        await asyncio.gather(*(instance.stop() for instance in self.instances), return_exceptions=True)
        daemons, self._daemons = self._daemons, {}
        await asyncio.gather(*(daemon.stop() for daemon in daemons.values()), return_exceptions=True)

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def status(self) -> SupervisorStatus:
        return SupervisorStatus(
            mode=self.mode,
            mode_reason=self.mode_reason,
            slots=tuple(instance.status() for instance in self.instances),
        )

    def update_env(self, changes: Mapping[str, str | None]) -> None:
        """Change the environment of later (re)starts of every slot; ``None`` removes a variable.

        E.g. after a Modal snapshot restore, drop the snapshot-mode variable so that a slot the
        watchdog restarts later comes up on the GPU directly.
        """
        for name, value in changes.items():
            if value is None:
                self._env.pop(name, None)
            else:
                self._env[name] = value
        for process in self._processes:
            process.update_env(changes)
        if self._processes:
            self.slots = [process.spec for process in self._processes]
        elif self._install_dir is not None:
            self.slots = self._build_slots()

    async def restart_gpu(self, gpu: int | None) -> None:
        """Restart every slot of one GPU together (and its MPS daemon); reports each as lost."""
        async with self._gpu_lock(gpu):
            await self._restart_gpu_locked(gpu)

    # -- internals

    def _build_slots(self) -> list[SlotSpec]:
        assert self._base_dir is not None
        return build_slots(
            base_dir=self._base_dir,
            base_port=self._base_port,
            gpus=self._gpus,
            slots_per_gpu=self._slots_per_gpu,
            cpu_slots=self._cpu_slots,
            env=self._env,
            extra_args=self._extra_args,
            mps=self._daemons,
        )

    def _make_process(self, spec: SlotSpec) -> ComfyProcess:
        assert self._install_dir is not None
        startup, grace, interval, timeout = self._timeouts
        base, cap = self._backoff
        return ComfyProcess(
            spec,
            install_dir=self._install_dir,
            python=self._python,
            startup_timeout=startup,
            stop_grace=grace,
            health_interval=interval,
            health_timeout=timeout,
            unhealthy_after=self._unhealthy_after,
            backoff=Backoff(base=base, cap=cap),
            on_lost=self._slot_lost,
            # Under MPS one slot's fatal fault kills its GPU's other clients too: restart them together.
            on_death=self._slot_died if self.mode == "mps" else None,
        )

    async def _slot_lost(self, spec: SlotSpec) -> None:
        await notify_slot_lost(self.on_slot_lost, spec)

    async def _start_mps(self) -> None:
        if not self._use_mps:
            self.mode, self.mode_reason = "plain", "MPS not requested"
            return
        if not self._gpus:
            self.mode, self.mode_reason = "plain", "MPS requested, but no GPUs are configured"
            return
        assert self._base_dir is not None
        root = self._mps_root or self._base_dir / "mps"
        daemons = {
            gpu: MpsDaemon(gpu, root, control=self._mps_control, nvidia_smi=self._nvidia_smi)
            for gpu in self._gpus
        }
        results = await asyncio.gather(*(d.start() for d in daemons.values()), return_exceptions=True)
        failures = [f"GPU {gpu}: {r}" for gpu, r in zip(daemons, results, strict=True) if r is not None]
        if failures:
            started = [d for d, r in zip(daemons.values(), results, strict=True) if r is None]
            await asyncio.gather(*(d.stop() for d in started), return_exceptions=True)
            self.mode = "plain"
            self.mode_reason = "MPS unavailable, running plain slots (" + "; ".join(failures) + ")"
            log.warning("%s", self.mode_reason)
            return
        self._daemons = daemons
        self.mode = "mps"
        self.mode_reason = f"one MPS control daemon per GPU ({', '.join(map(str, self._gpus))})"

    def _gpu_lock(self, gpu: int | None) -> asyncio.Lock:
        return self._gpu_locks.setdefault(gpu, asyncio.Lock())

    async def _slot_died(self, process: ComfyProcess, generation: int) -> None:
        gpu = process.spec.gpu
        backoff = self._gpu_backoff.setdefault(gpu, Backoff(*self._backoff))
        await asyncio.sleep(backoff.next_delay(process.last_uptime))
        async with self._gpu_lock(gpu):
            if process.generation != generation:
                return  # a sibling's death already restarted this GPU
            try:
                await self._restart_gpu_locked(gpu)
            except ComfyStartError as exc:
                log.error("restarting the slots of GPU %s failed: %s", gpu, exc)

    async def _restart_gpu_locked(self, gpu: int | None) -> None:
        processes = [p for p in self._processes if p.spec.gpu == gpu]
        if not processes:
            raise ValueError(f"no slots on GPU {gpu}")
        log.warning("restarting the %d slot(s) of GPU %s together", len(processes), gpu)
        for process in processes:
            await notify_slot_lost(self.on_slot_lost, process.spec)
        held: list[ComfyProcess] = []
        relaunch = False
        try:
            for process in processes:
                await process.hold()
                held.append(process)
            daemon = self._daemons.get(gpu) if gpu is not None else None
            if daemon is not None:
                try:
                    await daemon.restart()
                except MpsUnavailable as exc:
                    # The slots still find their GPU by UUID; they only lose the sharing.
                    log.error("MPS daemon of GPU %s did not come back: %s", gpu, exc)
                    self.mode_reason = f"{self.mode_reason}; GPU {gpu} restarted without MPS: {exc}"
            relaunch = True
        finally:
            # Interrupted (e.g. cancelled by stop()): free the slots without starting them.
            results = await asyncio.gather(*(p.release(start=relaunch) for p in held), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise ComfyStartError(f"GPU {gpu}: " + "; ".join(str(e) for e in errors)) from errors[0]


# ----------------------------------------------------------------------------------------- helpers


async def notify_slot_lost(callback: SlotLostCallback | None, spec: SlotSpec) -> None:
    """Run the worker's callback; its failure must not stop the restart."""
    if callback is None:
        return
    try:
        result = callback(spec)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("on_slot_lost failed for slot %d", spec.index)


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


def _open_sink(path: Path) -> IO[bytes]:
    return path.open("wb")


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


async def _run(
    argv: list[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    stdin: bytes | None = None,
    output_file: Path | None = None,
) -> tuple[int, str]:
    """Run a short helper command; returns its exit code and output (or the output file's tail)."""
    sink = _open_sink(output_file) if output_file is not None else None
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=sink if sink is not None else asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    finally:
        if sink is not None:
            sink.close()
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"{argv[0]} did not finish within {timeout:g} s"
    text = out.decode(errors="replace") if out else ""
    if output_file is not None:
        text = _tail(output_file)
    return proc.returncode if proc.returncode is not None else -1, text.strip()
