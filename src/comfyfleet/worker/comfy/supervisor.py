"""Start, watch and stop the ComfyUI slots of one worker host.

A host runs one ComfyUI process per *slot*: ``slots_per_gpu`` slots per GPU, or CPU-only slots
(``build_slots`` lays them out; each gets its own port, folders and database). With several slots on one
GPU, an NVIDIA MPS control daemon per GPU lets their kernels share the GPU instead of time-slicing it.
MPS is optional and best effort: when the binary is missing or the daemon does not come up, the
supervisor runs plain slots and records why (``mode`` / ``mode_reason``, shown by ``/readyz``). Under MPS
a fatal GPU fault in one client takes down every client of that GPU's server, so the death of one slot
restarts all slots of its GPU together (``restart_gpu``), and ``on_slot_lost`` tells the worker which
slots lost their jobs.

``Supervisor`` can also drive a ComfyUI that something else started (``url=``); then nothing is
started or restarted, only watched.

This module holds the slot layout (``build_slots``), the ``ComfyInstance`` protocol, ``Supervisor`` and
``SupervisorStatus``. The pieces it builds on live next door and are re-exported from here:
``slots.py`` (``SlotSpec``, ``SlotStatus``), ``process.py`` (one ComfyUI: ``ComfyProcess``,
``AttachedComfy``, ``Backoff``, ``ComfyStartError``) and ``mps.py`` (``MpsDaemon``, ``MpsUnavailable``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from comfyfleet.worker.comfy.mps import MPS_CONTROL, NVIDIA_SMI, MpsDaemon, MpsUnavailable
from comfyfleet.worker.comfy.process import (
    AttachedComfy,
    Backoff,
    ComfyProcess,
    ComfyStartError,
    DeathHandler,
)
from comfyfleet.worker.comfy.slots import (
    LISTEN_HOST,
    SlotLostCallback,
    SlotSpec,
    SlotState,
    SlotStatus,
    notify_slot_lost,
)

__all__ = [
    "DEFAULT_THREAD_ENV",
    "LISTEN_HOST",
    "MPS_CONTROL",
    "NVIDIA_SMI",
    "AttachedComfy",
    "Backoff",
    "ComfyInstance",
    "ComfyProcess",
    "ComfyStartError",
    "DeathHandler",
    "MpsDaemon",
    "MpsUnavailable",
    "SlotLostCallback",
    "SlotSpec",
    "SlotState",
    "SlotStatus",
    "Supervisor",
    "SupervisorMode",
    "SupervisorStatus",
    "build_slots",
    "notify_slot_lost",
]

log = logging.getLogger(__name__)

SupervisorMode = Literal["mps", "plain", "attached"]

# Several ComfyUI processes share the host's cores; without this each one sizes its CPU thread pools
# for the whole machine and they oversubscribe it.
DEFAULT_THREAD_ENV: Mapping[str, str] = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


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
