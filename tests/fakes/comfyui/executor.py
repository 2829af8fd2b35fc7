"""Runs one prompt at a time and emits the message sequence of transcripts 01-17.

Per executed node: progress_state(running) -> executing -> [progress -> preview]* -> executed ->
progress_state(finished). A cached output node only replays ``executed`` and a finished snapshot.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import Dirs, StandinConfig
from .control import HoldGate, InterruptRecord
from .hub import Hub
from .nodes import NODES, NodeResult, PreviewFrame
from .prompt_queue import QueueItem
from .validation import full_type_name, is_link


def now_ms() -> int:
    return int(time.time() * 1000)


class Interrupted(Exception):
    """ComfyUI's InterruptProcessingException."""


class NodeFailed(Exception):
    def __init__(self, node_id: str, class_type: str, error: BaseException, inputs: dict[str, Any]) -> None:
        super().__init__(str(error))
        self.node_id = node_id
        self.class_type = class_type
        self.error = error
        self.inputs = inputs


@dataclass
class _Cached:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None


@dataclass
class _Run:
    """State of the prompt being executed, including what goes into its history entry."""

    item: QueueItem
    signatures: dict[str, str | None]
    messages: list[list[Any]] = field(default_factory=list)
    ui_outputs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    values: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def prompt_id(self) -> str:
        return self.item.prompt_id


class _Plan:
    """Which node runs next: ComfyUI's staging order, including its "output nodes first" preference."""

    def __init__(self, prompt: dict[str, Any], outputs: list[str], cached: Callable[[str], bool]) -> None:
        self._prompt = prompt
        self._cached = cached
        self.waiting_on: dict[str, set[str]] = {}
        self.dependents: dict[str, set[str]] = defaultdict(set)
        for output_id in outputs:
            self._add(output_id)

    def _add(self, node_id: str) -> None:
        if node_id in self.waiting_on:
            return
        self.waiting_on[node_id] = set()
        for value in self._prompt[node_id].get("inputs", {}).values():
            if not is_link(value):
                continue
            source = str(value[0])
            if self._cached(source):
                continue  # cached upstream nodes are not staged at all (transcripts 14, 17)
            self._add(source)
            self.waiting_on[node_id].add(source)
            self.dependents[source].add(node_id)

    def _is_output(self, node_id: str) -> bool:
        return NODES[self._prompt[node_id]["class_type"]].output_node

    def next(self) -> str | None:
        ready = [n for n, deps in self.waiting_on.items() if not deps]
        if not ready:
            if self.waiting_on:
                raise RuntimeError("dependency cycle in prompt")
            return None
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(d) for d in self.dependents[node_id]):
                return node_id
        for node_id in ready:
            if any(self._is_output(dd) for d in self.dependents[node_id] for dd in self.dependents[d]):
                return node_id
        return ready[0]

    def done(self, node_id: str) -> None:
        del self.waiting_on[node_id]
        for dependent in self.dependents[node_id]:
            if dependent in self.waiting_on:
                self.waiting_on[dependent].discard(node_id)


class _Context:
    """The NodeContext handed to a running node."""

    def __init__(self, executor: Executor, run: _Run, node_id: str) -> None:
        self._executor = executor
        self._run = run
        self.prompt_id = run.prompt_id
        self.node_id = node_id
        self.dirs = executor.dirs
        self.config = executor.config
        self.extra_data = run.item.extra_data

    @property
    def previews_enabled(self) -> bool:
        method = self.extra_data.get("preview_method", self.config.preview_method)
        return method not in (None, "", "none")

    async def progress(self, value: int, total: int, preview: PreviewFrame | None = None) -> None:
        ex = self._executor
        if ex.interrupt_flag:
            raise Interrupted
        ex.update_progress(self._run, self.node_id, value, total)
        ex.send(
            "progress",
            {"value": value, "max": total, "prompt_id": self.prompt_id, "node": self.node_id},
            ex.client_id,
        )
        if preview is not None:
            metadata = {
                "node_id": self.node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": self.node_id,
                "parent_node_id": None,
                "real_node_id": self.node_id,
            }
            ex.hub.send_preview(preview.image, preview.format, metadata, ex.client_id)
        await asyncio.sleep(0)

    async def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if self._executor.interrupt_flag:
                raise Interrupted
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.01))


class Executor:
    def __init__(self, hub: Hub, dirs: Dirs, config: StandinConfig, gate: HoldGate) -> None:
        self.hub = hub
        self.dirs = dirs
        self.config = config
        self.gate = gate
        self.interrupt_flag = False
        self._interrupts: list[InterruptRecord] = []
        # Like server.client_id / server.last_node_id: used to greet a reconnecting owner.
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self._cache: dict[str, _Cached] = {}

    # --- messages --------------------------------------------------------------------------------

    def send(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        if event == "executing":
            self.last_node_id = data["node"]
        self.hub.send(event, data, sid)

    def _add_message(self, run: _Run, event: str, data: dict[str, Any], *, broadcast: bool) -> None:
        """History records every job message; the socket sees it only with a client_id (or broadcast)."""
        data = {**data, "timestamp": now_ms()}
        run.messages.append([event, data])
        if broadcast or self.client_id is not None:
            self.send(event, data, self.client_id)

    def _progress_state(self, run: _Run) -> None:
        nodes = {node_id: dict(entry) for node_id, entry in run.progress.items()}
        self.send("progress_state", {"prompt_id": run.prompt_id, "nodes": nodes}, self.client_id)

    def _progress_entry(self, run: _Run, node_id: str, value: float, maximum: float, state: str) -> None:
        run.progress[node_id] = {
            "value": value,
            "max": maximum,
            "state": state,
            "node_id": node_id,
            "prompt_id": run.prompt_id,
            "display_node_id": node_id,
            "parent_node_id": None,
            "real_node_id": node_id,
        }
        self._progress_state(run)

    def update_progress(self, run: _Run, node_id: str, value: int, total: int) -> None:
        self._progress_entry(run, node_id, value, total, "running")

    def _finish_progress(self, run: _Run, node_id: str) -> None:
        entry = run.progress.get(node_id)
        if entry is None:  # a cached node never started: ComfyUI reports it as 1 of 1 (ints)
            self._progress_entry(run, node_id, 1, 1, "finished")
        else:
            self._progress_entry(run, node_id, entry["max"], entry["max"], "finished")

    # --- interrupt -------------------------------------------------------------------------------

    def interrupt(self, record: InterruptRecord) -> None:
        self.interrupt_flag = True
        self._interrupts.append(record)

    # --- caching ---------------------------------------------------------------------------------

    def _signatures(self, prompt: dict[str, Any]) -> dict[str, str | None]:
        """Cache key per node: class, IS_CHANGED, literal inputs and the keys of linked ancestors.

        The node id is not part of it, so an identical graph is fully cached whatever its ids.
        """
        memo: dict[str, str | None] = {}

        def key(node_id: str, visiting: frozenset[str]) -> str | None:
            if node_id in memo:
                return memo[node_id]
            node = prompt.get(node_id)
            if node is None or node_id in visiting or node.get("class_type") not in NODES:
                return None
            cls = NODES[node["class_type"]]
            inputs = node.get("inputs", {})
            parts: list[Any] = [cls.name, cls.is_changed(self.dirs, inputs) if cls.is_changed else None]
            for name in sorted(inputs):
                value = inputs[name]
                if is_link(value):
                    upstream = key(str(value[0]), visiting | {node_id})
                    if upstream is None:
                        memo[node_id] = None
                        return None
                    parts.append([name, "link", upstream, value[1]])
                else:
                    parts.append([name, value])
            digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
            memo[node_id] = digest
            return digest

        return {node_id: key(node_id, frozenset()) for node_id in prompt}

    def _is_cached(self, run: _Run, node_id: str) -> bool:
        signature = run.signatures.get(node_id)
        return signature is not None and signature in self._cache

    # --- execution -------------------------------------------------------------------------------

    async def execute(self, item: QueueItem) -> dict[str, Any]:
        """Run one prompt; returns its history entry (written by the caller)."""
        self.interrupt_flag = False  # cleared at every prompt start (execution.py:678)
        self._interrupts = []
        self.client_id = item.extra_data.get("client_id")
        run = _Run(item=item, signatures=self._signatures(item.prompt))
        self._add_message(run, "execution_start", {"prompt_id": item.prompt_id}, broadcast=False)
        # The "classic" cache keeps only what the current prompt can use.
        live = {s for s in run.signatures.values() if s is not None}
        self._cache = {k: v for k, v in self._cache.items() if k in live}
        cached = [node_id for node_id in item.prompt if self._is_cached(run, node_id)]
        self._add_message(
            run, "execution_cached", {"nodes": cached, "prompt_id": item.prompt_id}, broadcast=False
        )

        status_str, completed = "success", True
        current: tuple[str, str] | None = None
        try:
            plan = _Plan(item.prompt, item.outputs_to_execute, lambda n: self._is_cached(run, n))
            while (node_id := plan.next()) is not None:
                current = (node_id, item.prompt[node_id]["class_type"])
                await self._run_node(run, node_id)
                plan.done(node_id)
                await asyncio.sleep(0)  # let HTTP handlers (interrupt, queue) in between nodes
            self._add_message(run, "execution_success", {"prompt_id": item.prompt_id}, broadcast=False)
        except Interrupted:
            status_str, completed = "error", False
            node_id, class_type = current or ("", "")
            payload = {
                "prompt_id": item.prompt_id,
                "node_id": node_id,
                "node_type": class_type,
                "executed": list(run.executed),
            }
            self._add_message(run, "execution_interrupted", payload, broadcast=True)
            for record in self._interrupts:
                record.stopped_prompt_id = item.prompt_id
        except NodeFailed as failure:
            status_str, completed = "error", False
            self._add_message(run, "execution_error", self._error_payload(run, failure), broadcast=False)
        return {
            "prompt": item.wire(),
            "outputs": run.ui_outputs,
            "status": {"status_str": status_str, "completed": completed, "messages": run.messages},
            "meta": run.meta,
        }

    def _error_payload(self, run: _Run, failure: NodeFailed) -> dict[str, Any]:
        error = failure.error
        return {
            "prompt_id": run.prompt_id,
            "node_id": failure.node_id,
            "node_type": failure.class_type,
            "executed": list(run.executed),
            "exception_message": f"{error}\n",
            "exception_type": full_type_name(error),
            "traceback": traceback.format_tb(error.__traceback__),
            "current_inputs": {name: [_format_value(v)] for name, v in failure.inputs.items()},
            "current_outputs": list(run.item.prompt),
        }

    def _record_ui(self, run: _Run, node_id: str, ui: dict[str, Any]) -> None:
        run.ui_outputs[node_id] = ui
        run.meta[node_id] = {
            "node_id": node_id,
            "display_node": node_id,
            "parent_node": None,
            "real_node_id": node_id,
        }
        if self.client_id is not None:
            data = {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": run.prompt_id}
            self.send("executed", data, self.client_id)

    async def _run_node(self, run: _Run, node_id: str) -> None:
        node = run.item.prompt[node_id]
        cls = NODES[node["class_type"]]
        signature = run.signatures.get(node_id)
        if signature is not None and signature in self._cache:
            hit = self._cache[signature]
            run.values[node_id] = hit.outputs
            if hit.ui:
                self._record_ui(run, node_id, hit.ui)
            self._finish_progress(run, node_id)
            return

        self._progress_entry(run, node_id, 0.0, 1.0, "running")
        if self.client_id is not None:
            self.send(
                "executing",
                {"node": node_id, "display_node": node_id, "prompt_id": run.prompt_id},
                self.client_id,
            )
        if self.interrupt_flag:  # checked at node start, after `executing` (transcript 07)
            raise Interrupted
        inputs = self._inputs(run, node_id)
        await self.gate.pass_through(cls.name, node_id)
        delay = self.config.delay_for(cls.name)
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            result: NodeResult = await cls.run(_Context(self, run, node_id), **inputs)
        except Interrupted:
            raise
        except Exception as exc:
            visible = {k: v for k, v in inputs.items() if k not in ("prompt", "extra_pnginfo")}
            raise NodeFailed(node_id, cls.name, exc, visible) from exc
        run.executed.append(node_id)
        run.values[node_id] = result.outputs
        if signature is not None:
            self._cache[signature] = _Cached(result.outputs, result.ui)
        if result.ui:
            self._record_ui(run, node_id, result.ui)
        self._finish_progress(run, node_id)

    def _inputs(self, run: _Run, node_id: str) -> dict[str, Any]:
        node = run.item.prompt[node_id]
        cls = NODES[node["class_type"]]
        values: dict[str, Any] = {}
        for name, value in node.get("inputs", {}).items():
            if cls.input_info(self.dirs, name) is None:
                continue  # extra keys (e.g. LoadImage's "upload") are ignored, as in ComfyUI
            if is_link(value):
                source = str(value[0])
                outputs = run.values.get(source)
                if outputs is None:
                    signature = run.signatures.get(source)
                    outputs = self._cache[signature].outputs if signature else ()
                values[name] = outputs[value[1]]
            else:
                values[name] = value
        hidden = cls.inputs(self.dirs).get("hidden", {})
        if "prompt" in hidden:
            values["prompt"] = run.item.prompt
        if "extra_pnginfo" in hidden:
            values["extra_pnginfo"] = run.item.extra_data.get("extra_pnginfo")
        return values


def _format_value(value: Any) -> Any:
    if value is None or isinstance(value, int | float | bool | str):
        return value
    return str(value)
