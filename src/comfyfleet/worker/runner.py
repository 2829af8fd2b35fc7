"""The ComfyUI job runner: the production ``JobExecutor``, one per ComfyUI slot.

For one claimed job it stages the job's input assets into a folder of the job's own, rewrites the
workflow (``core/ASSET`` references → those files, output prefixes forced into the job's folder,
node classes and file references checked), submits it, follows ComfyUI's events (progress,
previews, outputs committed as assets as soon as they exist), acts on cancel by interrupting that
prompt, and answers with one outcome. The worker loop turns the outcome into one conditional
transition.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.assets import repository as asset_repo
from comfyfleet.assets import service as assets
from comfyfleet.errors import Retryable, ValidationFailed
from comfyfleet.filenames import sanitize_filename
from comfyfleet.jobs import repository as job_repo
from comfyfleet.queue.executor import Canceled, Failed, JobContext, Outcome, Retry, Succeeded
from comfyfleet.runtime import Runtime
from comfyfleet.worker.comfy import events as ev
from comfyfleet.worker.comfy.catalog import NodeCatalog
from comfyfleet.worker.comfy.client import ComfyClient, ComfyError, ComfyUnavailable, ComfyValidationError
from comfyfleet.worker.comfy.graph import find_asset_refs
from comfyfleet.worker.comfy.policy import NodePolicy
from comfyfleet.worker.comfy.rewrite import prepare_for_run
from comfyfleet.worker.outputs import output_type
from comfyfleet.worker.progress import ProgressTracker

log = logging.getLogger(__name__)

JOBS_FOLDER = "jobs"


@dataclass
class Slot:
    """One ComfyUI process the runner drives. ``input_dir``/``output_dir``/``temp_dir`` are set when
    the files are on this machine (a supervised ComfyUI); otherwise inputs go through ``/upload`` and
    outputs through ``/view``. ``restart`` is how a slot that ignores an interrupt gets reset."""

    name: str
    client: ComfyClient
    input_dir: Path | None = None
    output_dir: Path | None = None
    temp_dir: Path | None = None
    restart: Callable[[], Awaitable[None]] | None = None
    healthy: Callable[[], bool] | None = None  # False while a supervised ComfyUI restarts
    jobs_run: int = 0
    interrupts: list[float] = field(default_factory=list)  # cancel→interrupt latencies (s), for benchmarks


class ComfyRunner:
    def __init__(self, runtime: Runtime, slot: Slot) -> None:
        self.runtime = runtime
        self.slot = slot
        self._policy: tuple[dict[str, Any], NodePolicy] | None = None
        self._cleanups: set[asyncio.Task[None]] = set()

    def available(self) -> bool:
        """Whether this runner should take a job now: not while its ComfyUI is down, so a job
        sent back to the queue by a slot's death goes to a slot that is up."""
        return self.slot.healthy is None or self.slot.healthy()

    async def policy(self) -> NodePolicy:
        object_info = await self.slot.client.object_info()
        # The client keeps one catalog object until it refreshes it; parsing ComfyUI's (545 classes)
        # for every job would cost milliseconds of each one.
        if self._policy is not None and self._policy[0] is object_info:
            return self._policy[1]
        policy = self._build_policy(object_info)
        self._policy = (object_info, policy)
        return policy

    def _build_policy(self, object_info: dict[str, Any]) -> NodePolicy:
        settings = self.runtime.settings
        catalog = NodeCatalog(object_info)
        policy = catalog.policy(
            allowed=frozenset(settings.node_allow) if settings.node_allow is not None else None,
        )
        if settings.node_deny:
            policy = NodePolicy(
                allowed=policy.allowed, denied=policy.denied | frozenset(settings.node_deny),
                catalog_classes=policy.catalog_classes, file_inputs=policy.file_inputs,
                prefix_classes=policy.prefix_classes,
            )
        return policy

    async def execute(self, ctx: JobContext) -> Outcome:
        job = ctx.job
        scratch = Path(tempfile.mkdtemp(prefix=f"cf-{job.id[:8]}-", dir=self._scratch_root()))
        outcome: Outcome | None = None
        try:
            outcome = await self._execute(ctx, scratch)
            return outcome
        finally:
            self.runtime.extras.get("latest_previews", {}).pop(job.id, None)
            cleanup = asyncio.to_thread(self._clean, job.id, scratch)
            if isinstance(outcome, Succeeded | Failed | Canceled):
                # A job that has ended is not staged again, so its folders can go while the worker
                # records the outcome, off the path to the client. A retry may be staged into the
                # same folders right after the requeue, so for it they are removed before.
                task = asyncio.create_task(cleanup)
                self._cleanups.add(task)
                task.add_done_callback(self._cleanups.discard)
            else:
                await cleanup

    async def _execute(self, ctx: JobContext, scratch: Path) -> Outcome:
        job = ctx.job
        try:
            staged = await self._stage_inputs(ctx, scratch)
            prompt = prepare_for_run(
                job.workflow, staged_inputs=staged, output_prefix=f"{JOBS_FOLDER}/{job.id}",
                policy=await self.policy(),
            )
        except ValidationFailed as exc:
            details = exc.details if isinstance(exc.details, dict) else None
            return Failed(exc.code, exc.message, details=details)
        except (Retryable, ComfyUnavailable) as exc:
            return Retry(str(exc))
        if ctx.cancel_requested.is_set():
            return Canceled()
        return await _Run(self, ctx, prompt, scratch).run()

    def _scratch_root(self) -> str:
        root = self.runtime.settings.data_dir / "worker"
        root.mkdir(parents=True, exist_ok=True)
        return str(root)

    async def _stage_inputs(self, ctx: JobContext, scratch: Path) -> dict[str, str]:
        """Each referenced asset (of the job's own tenant) into ``jobs/<job>/in/`` of ComfyUI's input
        folder; returns asset id → the name ComfyUI will load."""
        refs = find_asset_refs(ctx.job.workflow)
        if not refs:
            return {}
        async with self.runtime.reader.connect() as conn:
            rows = await asset_repo.get_assets(conn, ctx.job.tenant_id, [r.asset_id for r in refs])
            found = {a.id: a for a in rows}
        staged: dict[str, str] = {}
        subfolder = f"{JOBS_FOLDER}/{ctx.job.id}/in"
        for ref in refs:
            if ref.asset_id in staged:
                continue
            asset = found.get(ref.asset_id)
            if asset is None:
                raise ValidationFailed(f"Input asset {ref.asset_id} does not exist", code="missing_asset")
            name = f"{len(staged):02d}_{sanitize_filename(asset.file_path or 'input', default='input')}"
            if self.slot.input_dir is not None:
                await assets.stage_asset(self.runtime, asset, self.slot.input_dir / subfolder / name)
                staged[asset.id] = f"{subfolder}/{name}"
            else:
                local = scratch / name
                await assets.stage_asset(self.runtime, asset, local)
                staged[asset.id] = await self.slot.client.upload_input(local, name=name, subfolder=subfolder,
                                                                       overwrite=True)
        return staged

    def _clean(self, job_id: str, scratch: Path) -> None:
        shutil.rmtree(scratch, ignore_errors=True)
        for root in (self.slot.input_dir, self.slot.output_dir, self.slot.temp_dir):
            if root is not None:
                shutil.rmtree(root / JOBS_FOLDER / job_id, ignore_errors=True)


class _Run:
    """One prompt on ComfyUI, from submit to outcome."""

    def __init__(self, runner: ComfyRunner, ctx: JobContext, prompt: dict[str, Any], scratch: Path) -> None:
        self.runner = runner
        self.runtime = runner.runtime
        self.slot = runner.slot
        self.ctx = ctx
        self.prompt = prompt
        self.scratch = scratch
        self.prompt_id = f"{ctx.job.id}-{ctx.job.attempts}"
        self.tracker = ProgressTracker({node_id: node["class_type"] for node_id, node in prompt.items()})
        self.commits: list[asyncio.Task[None]] = []
        self.committed: set[tuple[str, str, str]] = set()
        self.cancel_sent_at: float | None = None

    async def run(self) -> Outcome:
        client = self.slot.client
        try:
            result = await client.submit(self.prompt, prompt_id=self.prompt_id,
                                         extra_data=self.ctx.job.extra_data or None)
        except ComfyValidationError as exc:
            return Failed("invalid_workflow", f"ComfyUI rejected the workflow: {exc.message}",
                          details=comfyui_validation_details(exc.error, exc.node_errors))
        except ComfyError as exc:
            return Retry(f"ComfyUI unavailable at submit: {exc.message}")
        del result
        self.slot.jobs_run += 1
        cancel_watch = asyncio.create_task(self._on_cancel())
        try:
            terminal = await self._follow()
        except ComfyUnavailable as exc:
            return Retry(f"lost ComfyUI while running: {exc.message}")
        finally:
            cancel_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cancel_watch
        return await self._outcome(terminal)

    async def _follow(self) -> ev.ComfyEvent | None:
        terminal: ev.ComfyEvent | None = None
        async for event in self.slot.client.follow(self.prompt_id):
            if isinstance(event, ev.Succeeded | ev.Failed | ev.Interrupted | ev.Lost):
                terminal = event
            elif isinstance(event, ev.Preview):
                await self._publish_preview(event)
            elif isinstance(event, ev.Executed):
                self._commit_files(event.node, event.output)
            elif isinstance(event, ev.Done):
                if event.recovered:  # events were lost: history has the outputs
                    for node_id, ui in event.outputs.items():
                        self._commit_files(str(node_id), ui)
                terminal = terminal or _terminal_from_done(event)
                break
            snapshot = self.tracker.apply(event)
            report = self.ctx.report_progress
            if snapshot is not None and report is not None and not self.ctx.cancel_requested.is_set():
                await report(snapshot)
        return terminal

    async def _outcome(self, terminal: ev.ComfyEvent | None) -> Outcome:
        if self.ctx.cancel_requested.is_set():
            await self._settle_commits()
            return Canceled()
        if isinstance(terminal, ev.Succeeded):
            try:
                await asyncio.gather(*self.commits)
            except Retryable as exc:
                return Retry(str(exc))
            if self.ctx.report_progress is not None:
                await self.ctx.report_progress(self.tracker.snapshot())
            return Succeeded()
        await self._settle_commits()
        if isinstance(terminal, ev.Failed):
            return Failed(
                "node_execution_error",
                f"{terminal.node_type or 'node'} {terminal.node_id}: "
                f"{terminal.exception_type}: {terminal.exception_message}",
                node_id=terminal.node_id, class_type=terminal.node_type,
                traceback="".join(terminal.traceback) or None,
            )
        if isinstance(terminal, ev.Interrupted):
            return Retry("the prompt was interrupted by someone else")
        return Retry(f"ComfyUI lost the prompt: {getattr(terminal, 'reason', 'unknown')}")

    async def _on_cancel(self) -> None:
        """Cancel: take the prompt out of ComfyUI's queue or interrupt it; when ComfyUI does not
        confirm within the grace period, restart the slot so the GPU really stops."""
        await self.ctx.cancel_requested.wait()
        self.cancel_sent_at = time.monotonic()
        try:
            await self.slot.client.cancel(self.prompt_id)
        except ComfyError:
            log.warning("%s: cancel of %s could not reach ComfyUI", self.slot.name, self.prompt_id)
        self.slot.interrupts.append(time.monotonic() - self.cancel_sent_at)
        await asyncio.sleep(self.runtime.settings.comfyui_cancel_grace_s)
        log.warning("%s: ComfyUI did not confirm the interrupt of %s; restarting the slot", self.slot.name,
                    self.prompt_id)
        if self.slot.restart is not None:
            await self.slot.restart()

    def _commit_files(self, node_id: str, ui_output: Any) -> None:
        if self.ctx.cancel_requested.is_set():
            return  # no output is committed once a cancel was accepted
        for file in ev.iter_output_files({node_id: ui_output}):
            identity = (file.type, file.subfolder, file.filename)
            if identity not in self.committed:
                self.committed.add(identity)
                self.commits.append(asyncio.create_task(self._commit(file)))

    async def _commit(self, file: ev.OutputFile) -> None:
        path = self._local_path(file)
        if path is None:
            path = self.scratch / "out" / f"{len(self.committed)}_{sanitize_filename(file.filename)}"
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                await self.slot.client.download_output(file.filename, file.subfolder, file.type, path)
            except ComfyError as exc:
                raise Retryable(f"could not read output {file.filename}: {exc.message}") from exc
        if self.ctx.cancel_requested.is_set():
            return
        job, worker = self.ctx.job, self.ctx.worker

        async def still_running(conn: AsyncConnection) -> bool:
            # The flag above lags the database by up to a cancel poll; this check, in the asset's own
            # transaction, is what keeps outputs from being committed after an accepted cancel.
            return await job_repo.lock_if_running(conn, job.id, worker=worker)

        asset = await assets.commit_output(
            self.runtime, tenant_id=job.tenant_id, job_id=job.id, job_expires_at=job.expires_at, path=path,
            node_id=file.node_id, output_type=output_type(file.media, file.filename), name=file.filename,
            guard=still_running,
        )
        if asset is not None and self.ctx.publish is not None:
            await self.ctx.publish("output", {"asset_id": asset.id})

    def _local_path(self, file: ev.OutputFile) -> Path | None:
        root = {"output": self.slot.output_dir, "temp": self.slot.temp_dir}.get(file.type)
        if root is None:
            return None
        path = (root / file.subfolder / file.filename).resolve()
        return path if path.is_relative_to(root.resolve()) and path.is_file() else None

    async def _settle_commits(self) -> None:
        """Let commits in flight end on their own (they stop at the cancel checks) rather than cancel
        them inside a database transaction or while the folders they read are being removed."""
        results = await asyncio.gather(*self.commits, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("%s: output of %s not committed: %s", self.slot.name, self.prompt_id, result)

    async def _publish_preview(self, event: ev.Preview) -> None:
        content_type = "image/png" if event.format == "PNG" else "image/jpeg"
        payload = {"node_id": event.node_id or "", "content_type": content_type,
                   "data_base64": base64.b64encode(event.image).decode()}
        self.runtime.extras.setdefault("latest_previews", {})[self.ctx.job.id] = payload
        if self.ctx.publish is not None:
            await self.ctx.publish("preview", payload)


def comfyui_validation_details(error: dict[str, Any], node_errors: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's 400 in the shape of our own submit-time 422 (graph.py), so a client reads per-node
    errors one way whichever side found them; ComfyUI's own body is kept beside it."""
    converted: dict[str, list[dict[str, str]]] = {}
    for node_id, entry in node_errors.items():
        errors = entry.get("errors") if isinstance(entry, dict) else None
        for item in errors if isinstance(errors, list) else []:
            if not isinstance(item, dict):
                continue
            message = str(item.get("message") or item.get("type") or "invalid")
            if item.get("details"):
                message = f"{message}: {item['details']}"
            detail = {"type": str(item.get("type") or "invalid_input"), "message": message}
            extra = item.get("extra_info")
            if isinstance(extra, dict) and isinstance(extra.get("input_name"), str):
                detail["input"] = extra["input_name"]
            converted.setdefault(str(node_id), []).append(detail)
    return {"node_errors": converted, "comfyui_error": error, "comfyui_node_errors": node_errors}


def _terminal_from_done(done: ev.Done) -> ev.ComfyEvent:
    if done.outcome == "success":
        return ev.Succeeded(done.prompt_id)
    if done.outcome == "interrupted":
        return ev.Interrupted(done.prompt_id, None, None)
    if done.outcome == "error":
        return ev.Failed(done.prompt_id, None, None, "error", "ComfyUI reported an error")
    return ev.Lost(done.prompt_id, "lost")
