"""The one tenant-scoping helper. Every tenant-facing query on a tenant-owned table goes through
``for_tenant``; a test checks that repositories use no other way to filter by tenant, so a foreign id
always answers exactly like a missing one."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import BindParameter, Delete, Select, Table, Update

Statement = TypeVar("Statement", bound=Select[Any] | Update | Delete)


def for_tenant(statement: Statement, table: Table, tenant_id: str | BindParameter[str]) -> Statement:
    """``tenant_id`` is the caller's tenant, or a bind parameter for statements built once."""
    return statement.where(table.c.tenant_id == tenant_id)  # type: ignore[return-value]  # .where keeps the type
