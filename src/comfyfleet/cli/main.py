"""The ``comfyfleet`` command."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer

from comfyfleet.cli import admin
from comfyfleet.config import ConfigurationError, Settings, render_env_example

app = typer.Typer(help="comfyfleet: ComfyUI workflows as a multi-tenant job service.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
app.add_typer(admin.tenants_app, name="tenants")
app.add_typer(admin.keys_app, name="keys")


def load_settings(**overrides: object) -> Settings:
    settings = Settings()
    updates = {k: v for k, v in overrides.items() if v is not None}
    return settings.model_copy(update=updates) if updates else settings


def _serve(settings: Settings, host: str, port: int, background: bool) -> None:
    import uvicorn

    from comfyfleet.api.app import create_app
    from comfyfleet.db.migrate import upgrade
    from comfyfleet.logging_setup import configure_logging

    configure_logging()
    if settings.public_base_url is None:
        settings = settings.model_copy(update={"public_base_url": f"http://{host}:{port}"})
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        app_ = create_app(settings, background=background)
    except ConfigurationError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    # The embedded default creates its schema on start; a fleet runs `comfyfleet db upgrade` once.
    asyncio.run(upgrade(settings.resolved_database_url))
    uvicorn.run(
        app_, host=host, port=port, log_level="info", access_log=False, loop="uvloop", http="httptools"
    )


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8189,
    comfyui_url: Annotated[str | None, typer.Option(help="Attach to a running ComfyUI.")] = None,
    comfyui_dir: Annotated[Path | None, typer.Option(help="Start and supervise ComfyUI from here.")] = None,
    workers: Annotated[int | None, typer.Option(help="Local worker slots.")] = None,
) -> None:
    """Run everything in one process: API, dispatcher, workers, reaper, webhook sender."""
    settings = load_settings(comfyui_url=comfyui_url, comfyui_dir=comfyui_dir, worker_slots=workers)
    _serve(settings, host, port, background=True)


@app.command()
def api(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8189,
) -> None:
    """Run the API alone (a fleet runs workers and the reaper separately)."""
    _serve(load_settings(dispatch="none"), host, port, background=True)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations to the configured database."""
    from comfyfleet.db.migrate import upgrade

    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(upgrade(settings.resolved_database_url, revision))
    typer.echo(f"database at {revision}")


@config_app.command("example")
def config_example(write: Annotated[Path | None, typer.Option(help="Write to this file.")] = None) -> None:
    """Print .env.example, generated from the settings model."""
    text = render_env_example()
    if write is not None:
        write.write_text(text)
    else:
        typer.echo(text, nl=False)


@app.command()
def reaper(once: Annotated[bool, typer.Option(help="One pass, then exit.")] = False) -> None:
    """Run the reaper on its own (leases, queue deadlines, retention)."""
    from comfyfleet.queue.reaper import reap_once, run_reaper
    from comfyfleet.runtime import Runtime

    async def main() -> None:
        runtime = await Runtime.create(load_settings())
        try:
            if once:
                typer.echo(str(await reap_once(runtime)))
            else:
                await run_reaper(runtime, asyncio.Event())
        finally:
            await runtime.close()

    asyncio.run(main())


def main() -> None:  # pragma: no cover - console entry
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
