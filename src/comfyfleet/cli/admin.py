"""Admin commands: tenants and API keys. A key is printed once, on stdout; only its digest is stored."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.config import Settings
from comfyfleet.db.engine import create_engine
from comfyfleet.tenants import keys as key_codec
from comfyfleet.tenants import repository as repo

tenants_app = typer.Typer(help="Tenants.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)

T = TypeVar("T")


def _run(action: Callable[[AsyncConnection, Settings], Awaitable[T]]) -> T:
    settings = Settings()

    async def main() -> T:
        engine = create_engine(settings.resolved_database_url)
        try:
            async with engine.begin() as conn:
                return await action(conn, settings)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def _fail(message: str) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(1)


@tenants_app.command("create")
def tenants_create(
    name: str, plan: Annotated[str, typer.Option(help="Plan name from settings.")] = "free"
) -> None:
    async def action(conn: AsyncConnection, settings: Settings) -> repo.Tenant:
        if plan not in settings.plans:
            raise _fail(f"unknown plan {plan!r}; configured: {', '.join(settings.plans)}")
        if await repo.get_tenant(conn, name) is not None:
            raise _fail(f"tenant {name!r} already exists")
        return await repo.create_tenant(conn, name, plan)

    tenant = _run(action)
    typer.echo(f"{tenant.id}\t{tenant.name}\t{tenant.plan}")


@tenants_app.command("list")
def tenants_list() -> None:
    async def action(conn: AsyncConnection, _settings: Settings) -> list[repo.Tenant]:
        return await repo.list_tenants(conn)

    for tenant in _run(action):
        typer.echo(f"{tenant.id}\t{tenant.name}\t{tenant.plan}")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Argument(help="Tenant id or name.")],
    scope: Annotated[list[str] | None, typer.Option("--scope", help="Repeat for several scopes.")] = None,
    name: Annotated[str | None, typer.Option(help="A label for the key.")] = None,
) -> None:
    """Create an API key and print it once."""
    try:
        scopes = key_codec.validate_scopes(scope or list(key_codec.DEFAULT_SCOPES))
    except ValueError as exc:
        raise _fail(str(exc)) from exc

    async def action(conn: AsyncConnection, settings: Settings) -> str:
        found = await repo.get_tenant(conn, tenant)
        if found is None:
            raise _fail(f"no tenant {tenant!r}")
        new = key_codec.generate_key(settings.env, settings.secret_bytes("key_pepper"))
        await repo.insert_key(
            conn, tenant_id=found.id, lookup=new.lookup, digest=new.digest, scopes=scopes, name=name
        )
        return new.plaintext

    typer.echo(_run(action))


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Argument(help="Tenant id or name.")] = None) -> None:
    async def action(conn: AsyncConnection, _settings: Settings) -> list[repo.ApiKeyRecord]:
        tenant_id = None
        if tenant is not None:
            found = await repo.get_tenant(conn, tenant)
            if found is None:
                raise _fail(f"no tenant {tenant!r}")
            tenant_id = found.id
        return await repo.list_keys(conn, tenant_id)

    for key in _run(action):
        state = "revoked" if key.revoked_at else "active"
        last_used = key.last_used_at.isoformat() if key.last_used_at else "-"
        typer.echo(
            f"{key.id}\t{key.tenant_id}\tcf_…{key.lookup}\t{','.join(key.scopes)}\t{state}\t"
            f"created={key.created_at.isoformat()}\tlast_used={last_used}"
        )


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="Key id or lookup prefix.")]) -> None:
    async def action(conn: AsyncConnection, _settings: Settings) -> bool:
        return await repo.revoke_key(conn, key)

    if not _run(action):
        raise _fail(f"no active key {key!r}")
    typer.echo("revoked")
