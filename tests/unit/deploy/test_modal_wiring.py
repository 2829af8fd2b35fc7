"""The Modal app's wiring, imported with the real ``modal`` package and no network: the functions and
the class exist with the options the settings ask for, and changing a setting changes the option."""

from __future__ import annotations

import importlib
import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import modal
import pytest
from modal._partial_function import _find_partial_methods_for_user_cls, _PartialFunctionFlags

from comfyfleet import config
from comfyfleet.config import ModalSettings, Settings
from comfyfleet.deploy import modal_app
from comfyfleet.deploy.dispatch import RUN_METHOD, WORKER_CLASS, ModalSpawner


@dataclass
class Recorded:
    """What the module passed to Modal while it was imported."""

    cls: dict[str, Any] = field(default_factory=dict)
    functions: dict[str, dict[str, Any]] = field(default_factory=dict)
    concurrent: list[dict[str, Any]] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


def _no_network(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("importing the Modal app must not touch the network")


@pytest.fixture
def load_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[ModuleType, Recorded]]]:
    """Import ``modal_app`` afresh with the given COMFYFLEET_* variables, recording what it asks Modal."""
    recorded = Recorded()
    real_cls, real_function, real_concurrent = modal.App.cls, modal.App.function, modal.concurrent
    real_secret, real_volume = modal.Secret.from_name, modal.Volume.from_name
    real_run = modal.Image.run_commands

    def spy_cls(self: modal.App, **kwargs: Any) -> Any:
        recorded.cls = kwargs
        return real_cls(self, **kwargs)

    def spy_function(self: modal.App, **kwargs: Any) -> Any:
        decorator = real_function(self, **kwargs)

        def record(target: Any) -> Any:
            raw = target._get_raw_f() if hasattr(target, "_get_raw_f") else target  # asgi_app: a partial
            recorded.functions[raw.__name__] = kwargs
            return decorator(target)

        return record

    def spy_concurrent(**kwargs: Any) -> Any:
        recorded.concurrent.append(kwargs)
        return real_concurrent(**kwargs)

    def spy_secret(name: str, **kwargs: Any) -> Any:
        recorded.secrets.append(name)
        return real_secret(name, **kwargs)

    def spy_volume(name: str, **kwargs: Any) -> Any:
        recorded.volumes.append(name)
        return real_volume(name, **kwargs)

    def spy_run(self: modal.Image, *commands: Any, **kwargs: Any) -> Any:
        recorded.commands.extend(str(c) for c in commands)
        return real_run(self, *commands, **kwargs)

    monkeypatch.setattr(modal.App, "cls", spy_cls)
    monkeypatch.setattr(modal.App, "function", spy_function)
    monkeypatch.setattr(modal, "concurrent", spy_concurrent)
    monkeypatch.setattr(modal.Secret, "from_name", staticmethod(spy_secret))
    monkeypatch.setattr(modal.Volume, "from_name", staticmethod(spy_volume))
    monkeypatch.setattr(modal.Image, "run_commands", spy_run)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)

    def load(**env: str) -> tuple[ModuleType, Recorded]:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        recorded.__init__()  # type: ignore[misc]
        config.get_settings.cache_clear()
        return importlib.reload(modal_app), recorded

    yield load
    monkeypatch.undo()
    config.get_settings.cache_clear()
    importlib.reload(modal_app)  # leave the module as a plain import makes it


def test_the_app_has_the_api_the_worker_class_and_the_schedule(load_app: Callable[..., Any]) -> None:
    module, _ = load_app()
    assert isinstance(module.app, modal.App) and module.app.name == "comfyfleet"
    assert isinstance(module.Worker, modal.Cls)
    user_cls = module.Worker._get_user_cls()
    assert user_cls.__name__ == WORKER_CLASS  # the name the API spawns by

    def methods(flag: _PartialFunctionFlags) -> set[str]:
        return set(_find_partial_methods_for_user_cls(user_cls, flag))

    assert methods(_PartialFunctionFlags.ENTER_PRE_SNAPSHOT) == {"start_comfyui"}
    assert methods(_PartialFunctionFlags.ENTER_POST_SNAPSHOT) == {"bind_gpu"}
    assert methods(_PartialFunctionFlags.CALLABLE_INTERFACE) == {RUN_METHOD}
    assert methods(_PartialFunctionFlags.EXIT) == {"stop"}
    for function in (module.api, module.housekeeping, module.admin):
        assert isinstance(function, modal.Function)


def test_the_worker_gets_the_options_the_settings_ask_for(load_app: Callable[..., Any]) -> None:
    _, recorded = load_app()
    knobs = ModalSettings()
    options = recorded.cls
    assert options["gpu"] == ["L40S", "A100-40GB", "A10G"]
    assert options["enable_memory_snapshot"] is True
    assert (options["min_containers"], options["max_containers"], options["buffer_containers"]) == (0, 20, 0)
    assert options["scaledown_window"] == 300
    assert options["timeout"] == knobs.job_timeout_s + modal_app.INPUT_OVERHEAD_S
    assert options["startup_timeout"] == 600
    assert "region" not in options
    # Resources match the slots: 4 slots x (1 core, 6 GiB).
    assert (options["cpu"], options["memory"]) == (4.0, 4 * 6144)
    assert set(options["volumes"]) == {"/models"}
    assert recorded.volumes == ["comfyfleet-models"]
    worker_concurrency = recorded.concurrent[-1]
    assert worker_concurrency == {"max_inputs": 4}


def test_secrets_are_named_by_settings_and_knobs_reach_the_containers(load_app: Callable[..., Any]) -> None:
    _, recorded = load_app(COMFYFLEET_MODAL__SECRET_NAMES='["cf-db","cf-storage"]')
    assert recorded.secrets == ["cf-db", "cf-storage"]
    for name in ("api", "housekeeping", "admin"):
        env = recorded.functions[name]["env"]
        assert env["COMFYFLEET_DISPATCH"] == "modal" and env["COMFYFLEET_ENV"] == "prod"
    # The containers read back exactly the knobs the decorators were built from.
    shipped = json.loads(recorded.cls["env"]["COMFYFLEET_MODAL"])
    assert ModalSettings(**shipped).secret_names == ["cf-db", "cf-storage"]


def test_changing_a_setting_changes_the_option(load_app: Callable[..., Any]) -> None:
    _, recorded = load_app(
        COMFYFLEET_MODAL__GPUS='["H200","H100"]',
        COMFYFLEET_MODAL__MIN_CONTAINERS="1",
        COMFYFLEET_MODAL__MAX_CONTAINERS="40",
        COMFYFLEET_MODAL__BUFFER_CONTAINERS="2",
        COMFYFLEET_MODAL__SCALEDOWN_WINDOW_S="120",
        COMFYFLEET_MODAL__SLOTS_PER_GPU="6",
        COMFYFLEET_MODAL__TARGET_INPUTS="5",
        COMFYFLEET_MODAL__JOB_TIMEOUT_S="900",
        COMFYFLEET_MODAL__STARTUP_TIMEOUT_S="300",
        COMFYFLEET_MODAL__REGION="us-east",
        COMFYFLEET_MODAL__API_MAX_INPUTS="250",
        COMFYFLEET_MODAL__HOUSEKEEPING_PERIOD_S="30",
    )
    options = recorded.cls
    assert options["gpu"] == ["H200", "H100"]
    assert (options["min_containers"], options["max_containers"], options["buffer_containers"]) == (1, 40, 2)
    assert options["scaledown_window"] == 120
    assert options["timeout"] == 900 + modal_app.INPUT_OVERHEAD_S and options["startup_timeout"] == 300
    assert options["region"] == "us-east"
    assert (options["cpu"], options["memory"]) == (6.0, 6 * 6144)
    assert {"max_inputs": 6, "target_inputs": 5} in recorded.concurrent
    assert {"max_inputs": 250} in recorded.concurrent  # the API's
    schedule = recorded.functions["housekeeping"]["schedule"]
    assert isinstance(schedule, modal.Period) and schedule.proto_message.period.seconds == 30


def test_the_image_pins_comfyui_comfy_cli_and_nodes(load_app: Callable[..., Any], tmp_path: Path) -> None:
    nodes = tmp_path / "nodes.txt"
    nodes.write_text("# pinned\nwas-node-suite-comfyui@1.0.2\ncomfyui-kjnodes@1.1.0  # resize node\n")
    _, recorded = load_app(
        COMFYFLEET_MODAL__COMFYUI_VERSION="0.8.0",
        COMFYFLEET_MODAL__COMFY_CLI_VERSION="1.5.3",
        COMFYFLEET_MODAL__CUSTOM_NODES_FILE=str(nodes),
    )
    commands = "\n".join(recorded.commands)
    assert "comfy-cli==1.5.3" in commands
    assert "install --fast-deps --nvidia --version 0.8.0" in commands
    assert "node install --fast-deps was-node-suite-comfyui@1.0.2" in commands
    assert "node install --fast-deps comfyui-kjnodes@1.1.0" in commands


def test_unpinned_custom_nodes_are_refused(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes.txt"
    nodes.write_text("was-node-suite-comfyui\n")
    with pytest.raises(ValueError, match="pinned as name@version"):
        modal_app.custom_node_specs(str(nodes))
    nodes.write_text("evil@1.0; rm -rf /\n")
    with pytest.raises(ValueError):
        modal_app.custom_node_specs(str(nodes))


def test_the_options_functions_are_pure() -> None:
    settings = Settings(modal=ModalSettings(gpus=["A10G"], slots_per_gpu=2, max_inputs=3, cpu_per_slot=1.5))
    options = modal_app.worker_options(settings)
    assert options["gpu"] == ["A10G"] and options["cpu"] == 3.0 and options["memory"] == 2 * 6144
    assert modal_app.concurrency_options(settings) == {"max_inputs": 3}
    with pytest.raises(ValueError, match="target_inputs"):
        modal_app.concurrency_options(Settings(modal=ModalSettings(slots_per_gpu=2, target_inputs=3)))


def test_the_admin_entry_runs_the_cli_and_returns_its_output() -> None:
    output = modal_app.run_cli(["config", "example"])
    assert "COMFYFLEET_MODAL=" in output


async def test_the_spawner_spawns_worker_run_job_by_name_and_cancels_by_call_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[str, ...]] = []

    async def spawn(*args: str) -> SimpleNamespace:
        seen.append(("spawn", *args))
        return SimpleNamespace(object_id="fc-123")

    def from_name(app_name: str, class_name: str) -> Callable[[], SimpleNamespace]:
        seen.append(("from_name", app_name, class_name))
        return lambda: SimpleNamespace(run_job=SimpleNamespace(spawn=SimpleNamespace(aio=spawn)))

    def from_id(call_id: str) -> SimpleNamespace:
        async def cancel() -> None:
            seen.append(("cancel", call_id))

        return SimpleNamespace(cancel=SimpleNamespace(aio=cancel))

    monkeypatch.setattr(modal.Cls, "from_name", staticmethod(from_name))
    monkeypatch.setattr(modal.FunctionCall, "from_id", staticmethod(from_id))
    spawner = ModalSpawner("comfyfleet-staging")
    assert await spawner.spawn("job-1", "ref-1") == "fc-123"
    assert await spawner.spawn("job-2", "ref-2") == "fc-123"
    await spawner.cancel("fc-9")
    assert seen == [
        ("from_name", "comfyfleet-staging", WORKER_CLASS),  # looked up once
        ("spawn", "job-1", "ref-1"),
        ("spawn", "job-2", "ref-2"),
        ("cancel", "fc-9"),
    ]


def test_containers_import_the_module_without_the_deploy_machines_files(
    load_app: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inside a container the custom nodes file of the deploy machine does not exist; images are not
    # built there, so the module must not read it.
    monkeypatch.setattr(modal, "is_local", lambda: False)
    module, recorded = load_app(COMFYFLEET_MODAL__CUSTOM_NODES_FILE="/nowhere/custom-nodes.txt")
    assert isinstance(module.Worker, modal.Cls)
    assert not any("node install" in command for command in recorded.commands)
