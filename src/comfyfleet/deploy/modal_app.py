"""comfyfleet on Modal: the API, the GPU workers and a housekeeping schedule, in one app.

    modal deploy -m comfyfleet.deploy.modal_app

Nothing here needs editing to deploy: every knob is a setting (``COMFYFLEET_MODAL__*``, see
docs/deploy-modal.md and docs/scaling.md). The settings are read once, below, on the machine that
deploys, and passed to every container as ``COMFYFLEET_MODAL``, so the containers run with the knobs
their decorators were built from. Secrets (database URL, storage keys, key pepper, webhook keys) come
only from the Modal secrets named in ``settings.modal.secret_names``.

The shape, top to bottom: settings → the options the decorators take (pure functions, tested) →
images → volume and secrets → the app: the API (``@modal.asgi_app``), the GPU ``Worker`` class with
memory snapshots, the housekeeping schedule, and an admin entry for tenants and keys.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import modal

import comfyfleet
from comfyfleet.config import Settings, get_settings
from comfyfleet.deploy import snapshot_node
from comfyfleet.deploy.modal_worker import (
    COMFY_VENV,
    COMFYUI_DIR,
    MODELS_DIR,
    SNAPSHOT_NODE_NAME,
    ModalContainer,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

settings = get_settings()  # read once, here

# Room on top of the per-job timeout for what an input does besides the job (waiting for a slot,
# claiming, the last upload): the worker's own job timeout must fire before Modal's.
INPUT_OVERHEAD_S = 120
# The API serves SSE streams that follow a job for its whole run.
API_TIMEOUT_S = 3600
HOUSEKEEPING_OVERLAP_S = 60

# ------------------------------------------------------------------------- options from settings


def worker_options(settings: Settings) -> dict[str, Any]:
    """``@app.cls`` options of the GPU worker (image, secrets and volumes aside)."""
    knobs = settings.modal
    slots = knobs.slots_per_gpu  # one GPU per container: Modal scales by containers
    options: dict[str, Any] = {
        "gpu": list(knobs.gpus),  # preference order; Modal falls back along the list
        "enable_memory_snapshot": True,
        "cpu": slots * knobs.cpu_per_slot,
        "memory": slots * knobs.memory_mib_per_slot,
        "min_containers": knobs.min_containers,
        "max_containers": knobs.max_containers,
        "buffer_containers": knobs.buffer_containers,
        "scaledown_window": knobs.scaledown_window_s,
        "timeout": knobs.job_timeout_s + INPUT_OVERHEAD_S,
        "startup_timeout": knobs.startup_timeout_s,
    }
    if knobs.region:
        options["region"] = knobs.region
    return options


def concurrency_options(settings: Settings) -> dict[str, int]:
    """``@modal.concurrent`` options: one input per ComfyUI slot unless the settings say otherwise."""
    knobs = settings.modal
    max_inputs = knobs.max_inputs or knobs.slots_per_gpu
    options = {"max_inputs": max_inputs}
    if knobs.target_inputs is not None:
        if not 1 <= knobs.target_inputs <= max_inputs:
            raise ValueError(f"modal.target_inputs must be between 1 and max_inputs ({max_inputs})")
        options["target_inputs"] = knobs.target_inputs
    return options


def api_options(settings: Settings) -> dict[str, Any]:
    return {"min_containers": settings.modal.api_min_containers, "timeout": API_TIMEOUT_S}


def housekeeping_options(settings: Settings) -> dict[str, Any]:
    period = settings.modal.housekeeping_period_s
    # Each run works for a whole period; the next one starts as it ends (the overlap is harmless:
    # every step is a conditional UPDATE).
    return {"schedule": modal.Period(seconds=period), "timeout": period + HOUSEKEEPING_OVERLAP_S}


def container_env(settings: Settings) -> dict[str, str | None]:
    """Non-secret environment of every container: the deploy-time knobs, and the modal dispatcher."""
    return {
        "COMFYFLEET_ENV": settings.modal.environment,
        "COMFYFLEET_DISPATCH": "modal",
        "COMFYFLEET_MODAL": settings.modal.model_dump_json(),
    }


_NODE_SPEC = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*@[A-Za-z0-9][A-Za-z0-9._+-]*$")


def custom_node_specs(path: str | None) -> list[str]:
    """``name@version`` lines of the custom nodes file (``#`` comments); refuses unpinned lines."""
    if path is None:
        return []
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    specs = [line for line in lines if line]
    bad = [spec for spec in specs if not _NODE_SPEC.match(spec)]
    if bad:
        raise ValueError(f"{path}: custom nodes must be pinned as name@version, got {bad}")
    return specs


# ---------------------------------------------------------------------------------------- images

_PROJECT_ROOT = Path(comfyfleet.__file__).resolve().parents[2]  # src layout: <root>/src/comfyfleet
_LOCKFILE = _PROJECT_ROOT / "requirements.lock"
_COMFY = [f"{COMFY_VENV}/bin/comfy", "--skip-prompt", "--workspace", COMFYUI_DIR]
# ComfyUI finds the models on the volume through this file; its own models/ (configs) stays.
_MODEL_FOLDERS = (
    "checkpoints",
    "clip",
    "clip_vision",
    "configs",
    "controlnet",
    "diffusion_models",
    "embeddings",
    "loras",
    "text_encoders",
    "unet",
    "upscale_models",
    "vae",
)
EXTRA_MODEL_PATHS = (
    "comfyfleet:\n  base_path: "
    + MODELS_DIR
    + "\n"
    + "".join(f"  {folder}: {folder}\n" for folder in _MODEL_FOLDERS)
)


def base_image(settings: Settings) -> modal.Image:
    """Python and comfyfleet's pinned dependencies: the API and housekeeping run on this."""
    image = modal.Image.debian_slim(python_version=settings.modal.python_version)
    if modal.is_local() and not _LOCKFILE.exists():
        # Fail the build, not the import: tests and `modal deploy --help` still work without it.
        message = shlex.quote(f"missing {_LOCKFILE.name}: run `make lock`")
        return image.run_commands(f"echo {message} >&2; exit 1")
    return image.uv_pip_install(requirements=[str(_LOCKFILE)])


def gpu_image(settings: Settings) -> modal.Image:
    """The base, plus ComfyUI (pinned, by a pinned comfy-cli) and the pinned custom nodes in a venv of
    their own, so their pins never meet comfyfleet's; plus our snapshot helper node."""
    knobs = settings.modal
    comfy = shlex.join(_COMFY)
    image = (
        base_image(settings)
        .apt_install("git", "libgl1", "libglib2.0-0")  # git: comfy install; GL/glib: OpenCV in nodes
        .run_commands(
            shlex.join(["python", "-m", "venv", COMFY_VENV]),
            shlex.join([f"{COMFY_VENV}/bin/pip", "install", f"comfy-cli=={knobs.comfy_cli_version}"]),
            f"{comfy} install --fast-deps --nvidia --version {shlex.quote(knobs.comfyui_version)}",
        )
    )
    # Containers import this module too, without the deploy machine's files; they do not build images.
    nodes = custom_node_specs(knobs.custom_nodes_file) if modal.is_local() else []
    if nodes:
        image = image.run_commands(*(f"{comfy} node install --fast-deps {shlex.quote(s)}" for s in nodes))
    model_paths = shlex.quote(f"{COMFYUI_DIR}/extra_model_paths.yaml")
    image = image.run_commands(f"printf %s {shlex.quote(EXTRA_MODEL_PATHS)} > {model_paths}")
    return image.add_local_dir(
        Path(snapshot_node.__file__).parent,
        f"{COMFYUI_DIR}/custom_nodes/{SNAPSHOT_NODE_NAME}",
        ignore=lambda path: "__pycache__" in path.parts,
    )


api_image = base_image(settings).add_local_python_source("comfyfleet")
worker_image = gpu_image(settings).add_local_python_source("comfyfleet")

# ------------------------------------------------------------------------- volume, secrets, app

models = modal.Volume.from_name(settings.modal.models_volume, create_if_missing=True)
secrets = [modal.Secret.from_name(name) for name in settings.modal.secret_names]

app = modal.App(settings.modal.app_name)


# --------------------------------------------------------------------------------------------- API


@app.function(image=api_image, secrets=secrets, env=container_env(settings), **api_options(settings))
@modal.concurrent(max_inputs=settings.modal.api_max_inputs)
@modal.asgi_app()
def api() -> FastAPI:
    """The Comfy API v2. Besides requests it runs the modal dispatcher (claims queued jobs inside the
    quotas and spawns ``Worker.run_job``) and the reaper, while it is up."""
    from comfyfleet.api.app import create_app

    return create_app(settings.model_copy(update={"dispatch": "modal"}))


# -------------------------------------------------------------------------------------- GPU worker


@app.cls(
    image=worker_image,
    secrets=secrets,
    env=container_env(settings),
    volumes={MODELS_DIR: models.with_mount_options(read_only=True)},
    **worker_options(settings),
)
@modal.concurrent(**concurrency_options(settings))
class Worker:
    """Several ComfyUI slots on one GPU; one input (a job) per slot.

    The API spawns ``Worker.run_job`` by name (``dispatch.WORKER_CLASS`` / ``RUN_METHOD``)."""

    @modal.enter(snap=True)
    async def start_comfyui(self) -> None:
        """No GPU yet: start the slots on the CPU and import what jobs need; all of it is snapshotted."""
        self.container = ModalContainer(settings)
        await self.container.start_comfyui()

    @modal.enter(snap=False)
    async def bind_gpu(self) -> None:
        """After the restore: start MPS if asked (plain slots when it cannot run), bind the GPU through
        the snapshot node, connect to the database, start the health timer."""
        await self.container.bind_gpu()

    @modal.method()
    async def run_job(self, job_id: str, dispatch_ref: str) -> str:
        """Claim the dispatched job (a stale or duplicate spawn finds nothing) and run it on a free slot."""
        return await self.container.run_job(job_id, dispatch_ref)

    @modal.exit()
    async def stop(self) -> None:
        await self.container.close()


# ------------------------------------------------------------------------------------ housekeeping


@app.function(image=api_image, secrets=secrets, env=container_env(settings), **housekeeping_options(settings))
async def housekeeping() -> None:
    """Reaper, dispatcher and webhook sender, on a schedule.

    Why here and not only in the API container: the API runs them only while it is up, and Modal
    scales it to zero when no client calls. A client that waits for a webhook instead of polling would
    then wait for ever: leases would not lapse, queue deadlines would not expire, queued jobs would
    not be dispatched, webhooks would not be sent. This function keeps all of that moving for the
    cost of one small CPU container; every step is a conditional UPDATE, so running it beside the
    API's own loops is safe.
    """
    from comfyfleet.deploy.dispatch import run_housekeeping
    from comfyfleet.runtime import Runtime

    runtime = await Runtime.create(settings)
    try:
        await run_housekeeping(runtime, float(settings.modal.housekeeping_period_s))
    finally:
        await runtime.close()


# ------------------------------------------------------------------------------------------- admin


def run_cli(argv: list[str]) -> str:
    """``comfyfleet <argv>`` in this process; returns what it printed (a new key is printed once)."""
    import click
    import typer

    from comfyfleet.cli.main import app as cli_app

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            typer.main.get_command(cli_app).main(args=argv, prog_name="comfyfleet", standalone_mode=False)
        except click.exceptions.Exit:
            pass
        except click.ClickException as exc:
            exc.show()
    return out.getvalue()


@app.function(image=api_image, secrets=secrets, env=container_env(settings), timeout=300)
def admin(argv: list[str]) -> str:
    """The admin CLI inside Modal, with the production secrets (they never leave Modal)."""
    return run_cli(argv)


@app.local_entrypoint()
def manage(command: str) -> None:
    """``modal run -m comfyfleet.deploy.modal_app::manage --command "tenants create acme --plan pro"``.

    The output comes back as the return value, so a new API key is shown here and not kept in logs."""
    sys.stdout.write(admin.remote(shlex.split(command)))
