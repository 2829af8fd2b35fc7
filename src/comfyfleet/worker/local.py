"""The local dispatcher's workers: one ComfyUI runner per slot, for ``comfyfleet serve``.

With ``--comfyui-url`` the runner attaches to a ComfyUI run by something else (inputs go through
``/upload``, outputs through ``/view``); with ``--comfyui-dir`` the supervisor starts one ComfyUI per
slot with its own folders and port, and the runner reads and writes those folders directly. Each
worker publishes ComfyUI's node catalog, so submissions are validated against it."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable

from comfyfleet.jobs import repository as job_repo
from comfyfleet.queue.executor import JobExecutor
from comfyfleet.runtime import Runtime
from comfyfleet.worker.comfy.client import ComfyClient
from comfyfleet.worker.comfy.supervisor import (
    ComfyInstance,
    ComfyProcess,
    SlotLostCallback,
    SlotSpec,
    Supervisor,
)
from comfyfleet.worker.runner import ComfyRunner, Slot

Close = Callable[[], Awaitable[None]]


def build_supervisor(runtime: Runtime, on_slot_lost: SlotLostCallback | None = None) -> Supervisor:
    settings = runtime.settings
    if settings.comfyui_dir is not None:
        return Supervisor(
            on_slot_lost=on_slot_lost,
            install_dir=settings.comfyui_dir,
            base_dir=settings.data_dir / "comfyui-slots",
            base_port=settings.comfyui_base_port,
            gpus=settings.comfyui_gpus,
            slots_per_gpu=settings.comfyui_slots_per_gpu,
            cpu_slots=settings.worker_slots,
            env=settings.comfyui_slot_env,
            use_mps=settings.comfyui_use_mps,
            python=settings.comfyui_python,
        )
    return Supervisor(url=settings.comfyui_url)


async def slots_from(supervisor: Supervisor, worker_name: str) -> list[Slot]:
    slots: list[Slot] = []
    for index, instance in enumerate(supervisor.instances):
        client = ComfyClient(instance.url, client_id=f"comfyfleet-{worker_name}-{index}")
        slot = Slot(
            name=f"{worker_name}-{index}",
            client=client,
            restart=_restarter(instance),
            healthy=_health_of(instance),
        )
        if isinstance(instance, ComfyProcess):
            spec = instance.spec
            # ComfyUI puts temp files in a `temp` folder *inside* --temp-directory.
            slot.input_dir, slot.output_dir = spec.input_dir, spec.output_dir
            slot.temp_dir = spec.temp_dir / "temp"
        slots.append(slot)
    return slots


def _health_of(instance: ComfyInstance) -> Callable[[], bool]:
    return lambda: instance.status().ready


def _restarter(instance: object) -> Callable[[], Awaitable[None]]:
    async def restart() -> None:
        await instance.restart()  # type: ignore[attr-defined]

    return restart


async def publish_catalog(runtime: Runtime, worker: str, client: ComfyClient) -> None:
    object_info = await client.object_info(refresh=True)
    async with runtime.engine.begin() as conn:
        await job_repo.store_catalog(conn, worker, object_info)
    runtime.catalog_cache.invalidate()


async def build_executors(runtime: Runtime, supervisor: Supervisor, worker: str) -> list[ComfyRunner]:
    """One runner per slot of a started supervisor, in slot order; publishes the node catalog.
    The local dispatcher and the Modal container both build their workers here."""
    slots = await slots_from(supervisor, worker)
    if slots:
        await publish_catalog(runtime, worker, slots[0].client)
    return [ComfyRunner(runtime, slot) for slot in slots]


async def start_local_workers(runtime: Runtime) -> tuple[list[JobExecutor], Close]:
    by_index: dict[int, ComfyRunner] = {}

    def slot_lost(spec: SlotSpec) -> None:
        # The supervisor saw the process die: end its prompt at once, so the job is requeued now
        # and, with this slot unavailable until it is back, runs on another slot.
        runner = by_index.get(spec.index)
        if runner is not None:
            runner.slot.client.abandon(f"ComfyUI slot {spec.index} died")

    supervisor = build_supervisor(runtime, on_slot_lost=slot_lost)
    await supervisor.start()
    runtime.extras["supervisor"] = supervisor
    runners = await build_executors(runtime, supervisor, socket.gethostname())
    by_index.update(enumerate(runners))

    async def close() -> None:
        for runner in runners:
            with contextlib.suppress(Exception):
                await runner.slot.client.aclose()
        await supervisor.stop()

    return list(runners), close
