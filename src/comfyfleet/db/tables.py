"""The schema, declared once (SQLAlchemy Core). Alembic migrations must produce exactly this; a test
compares them."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out on every backend. SQLite keeps naive text, so values are stored as
    naive UTC there (which also keeps its string comparisons correct) and made aware again on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use UTC-aware values")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def ts(name: str, nullable: bool = True) -> Column[datetime]:
    return Column(name, UtcDateTime(), nullable=nullable)


tenants = Table(
    "tenants",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("plan", String(64), nullable=False),
    ts("created_at", nullable=False),
    Column("url_allowed_domains", JSON, nullable=True),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("tenant_id", String(36), ForeignKey("tenants.id"), nullable=False, index=True),
    Column("lookup", String(32), nullable=False, unique=True),
    Column("digest", String(64), nullable=False),
    Column("scopes", JSON, nullable=False),
    Column("name", String(200), nullable=True),
    ts("created_at", nullable=False),
    ts("last_used_at"),
    ts("revoked_at"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("tenant_id", String(36), ForeignKey("tenants.id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("workflow", JSON, nullable=False),
    Column("extra_data", JSON, nullable=True),
    Column("labels", JSON, nullable=True),
    Column("webhook_url", Text, nullable=True),
    ts("created_at", nullable=False),
    ts("started_at"),
    ts("completed_at"),
    ts("expires_at", nullable=False),
    ts("queue_deadline_at", nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("lease_owner", String(128), nullable=True),
    ts("lease_expires_at"),
    ts("cancel_requested_at"),
    Column("dispatch_ref", String(128), nullable=True),
    Column("dispatch_call_id", String(128), nullable=True),
    ts("dispatched_at"),
    Column("progress", JSON, nullable=True),
    Column("error", JSON, nullable=True),
    Column("version", Integer, nullable=False, default=0),
    Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
    Index("ix_jobs_status_priority_created", "status", "priority", "created_at"),
    Index("ix_jobs_tenant_status", "tenant_id", "status"),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("tenant_id", String(36), primary_key=True),
    Column("scope", String(64), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("request_digest", String(64), nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("resource_id", String(36), nullable=True),
    ts("created_at", nullable=False),
    ts("expires_at", nullable=False),
)

blobs = Table(
    "blobs",
    metadata,
    Column("tenant_id", String(36), primary_key=True),
    Column("hash", String(80), primary_key=True),
    Column("size_bytes", BigInteger, nullable=False),
    Column("storage_key", Text, nullable=False),
    ts("created_at", nullable=False),
)

assets = Table(
    "assets",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("tenant_id", String(36), ForeignKey("tenants.id"), nullable=False),
    Column("hash", String(80), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("content_type", String(255), nullable=False),
    Column("file_path", Text, nullable=True),
    Column("tags", JSON, nullable=True),
    Column("job_id", String(36), nullable=True),
    Column("node_id", String(64), nullable=True),
    Column("output_type", String(16), nullable=True),
    ts("created_at", nullable=False),
    ts("expires_at"),
    Index("ix_assets_tenant_hash", "tenant_id", "hash"),
    Index("ix_assets_job", "job_id"),
    Index("ix_assets_expires", "expires_at"),
)

node_catalogs = Table(
    "node_catalogs",
    metadata,
    Column("worker", String(128), primary_key=True),
    Column("object_info", JSON, nullable=False),
    ts("updated_at", nullable=False),
)

# Per-tenant webhook endpoints. ``kind`` is "endpoint" for a URL the tenant registered, or "job_url"
# for the tenant's one signing secret for per-job ``webhook_url`` deliveries (its ``url`` is empty and
# its id is derived from the tenant id, so creating it twice collides on the primary key).
# Secrets are AES-GCM ciphertext (webhooks.secrets), never plaintext.
webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("tenant_id", String(36), ForeignKey("tenants.id"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("url", Text, nullable=False),
    Column("description", Text, nullable=True),
    Column("events", JSON, nullable=False),
    Column("secret", Text, nullable=False),
    Column("previous_secret", Text, nullable=True),
    ts("previous_secret_expires_at"),
    Column("enabled", Boolean, nullable=False),
    Column("disabled_reason", Text, nullable=True),
    ts("created_at", nullable=False),
    ts("updated_at", nullable=False),
    Index("ix_webhook_endpoints_tenant_created", "tenant_id", "created_at", "id"),
)

# The outbox: one row per (event, destination), written in the transaction of the job's state change.
# ``id`` is the webhook-id, the same across attempts. ``target`` names the destination the sender
# isolates concurrency by (the endpoint, or tenant + URL digest for a per-job URL); ``locked_by`` /
# ``locked_until`` are the lease a sender holds while one attempt is in flight.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", String(36), nullable=False),
    Column("endpoint_id", String(36), nullable=True),
    Column("url", Text, nullable=True),  # per-job webhook_url when endpoint_id is null
    Column("target", String(96), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("job_id", String(36), nullable=True),
    Column("payload", JSON, nullable=False),
    Column("status", String(16), nullable=False),  # pending, delivered, dead, disabled
    Column("attempts", Integer, nullable=False),
    ts("next_attempt_at", nullable=False),
    Column("locked_by", String(128), nullable=True),
    ts("locked_until"),
    ts("created_at", nullable=False),
    ts("delivered_at"),
    Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at", "id"),
    Index("ix_webhook_deliveries_tenant_created", "tenant_id", "created_at"),
)

webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("delivery_id", String(40), nullable=False, index=True),
    Column("tenant_id", String(36), nullable=False),
    ts("attempted_at", nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("response_excerpt", LargeBinary, nullable=True),
    Column("duration_ms", Integer, nullable=True),
)
