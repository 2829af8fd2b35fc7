"""The one settings model. Every knob the service reads lives here, with the env prefix ``COMFYFLEET_``.

``.env.example`` is generated from this model (``comfyfleet config example``) and a test keeps the two
equal. Nested models are set with ``__`` (``COMFYFLEET_MODAL__GPUS='["H100","A100-80GB"]'``); dicts and
lists take JSON.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Environment = Literal["dev", "test", "prod"]

# Secrets that must never reach production: empty, or one of these markers.
PLACEHOLDER_MARKERS = ("change-me", "changeme", "placeholder", "example", "dev-only", "xxx")


class PlanLimits(BaseModel):
    """What a plan allows. Jobs copy the relevant numbers when they are created."""

    priority: int = Field(0, description="Higher runs first; fair share applies within one priority.")
    max_running: int = Field(2, description="Jobs of one tenant running at once.")
    max_queued: int = Field(100, description="Jobs of one tenant waiting; more answers 429 queue_full.")
    queue_deadline_s: int = Field(3600, description="A job still queued this long after submit expires.")
    max_attempts: int = Field(3, description="Runs of one job before a lost worker fails it.")
    retention_s: int = Field(7 * 86400, description="How long jobs, outputs and inputs are kept.")
    max_upload_bytes: int = Field(512 * 1024 * 1024, description="Largest asset upload.")
    max_nodes: int = Field(500, description="Largest workflow, in nodes.")
    submit_rate: str = Field("60/minute", description="Job submissions per API key (limits syntax).")
    read_rate: str = Field("1200/minute", description="Reads per API key (limits syntax).")


def default_plans() -> dict[str, PlanLimits]:
    return {
        "free": PlanLimits(priority=0, max_running=1, max_queued=20),
        "pro": PlanLimits(priority=10, max_running=4, max_queued=200),
        "enterprise": PlanLimits(priority=20, max_running=16, max_queued=2000, submit_rate="600/minute"),
    }


class ModalSettings(BaseModel):
    """Knobs of the Modal deployment (see docs/deploy-modal.md for how to choose them)."""

    app_name: str = "comfyfleet"
    gpus: list[str] = Field(default_factory=lambda: ["L40S", "A100-40GB", "A10G"])
    min_containers: int = 0
    max_containers: int = 20
    buffer_containers: int = 0
    scaledown_window_s: int = 300
    slots_per_gpu: int = 4
    threads_per_slot: int = 1
    use_mps: bool = True
    max_inputs: int | None = Field(None, description="@modal.concurrent max_inputs; default slots_per_gpu.")
    target_inputs: int | None = Field(None, description="@modal.concurrent target_inputs.")
    job_timeout_s: int = 1800
    startup_timeout_s: int = 600
    region: str | None = None
    cpu_per_slot: float = 1.0
    memory_mib_per_slot: int = 6144
    secret_names: list[str] = Field(default_factory=lambda: ["comfyfleet"])
    models_volume: str = "comfyfleet-models"
    comfyui_version: str = "0.8.0"
    comfy_cli_version: str = "1.5.3"
    custom_nodes_file: str | None = Field(
        None, description="Pinned custom nodes (one `name@version` a line)."
    )
    inflight_cap: int = Field(64, description="Jobs dispatched to Modal and not yet finished, fleet-wide.")
    cancel_grace_s: float = Field(10.0, description="After this, FunctionCall.cancel() backs up a cancel.")
    python_version: str = Field("3.11", description="Python of the image (comfyfleet and ComfyUI's venv).")
    environment: Environment = Field(
        "prod", description="COMFYFLEET_ENV of the Modal containers (set here, not in the secret)."
    )
    api_max_inputs: int = Field(100, description="Requests one API container serves at once.")
    api_min_containers: int = Field(0, description="API containers kept warm (1 avoids its cold start).")
    dispatch_interval_s: float = Field(1.0, description="Dispatcher pass period when nothing wakes it.")
    dispatch_timeout_s: float = Field(
        900.0, description="A spawn not claimed this long after dispatch is given back and dispatched again."
    )
    health_interval_s: float = Field(15.0, description="GPU worker's ComfyUI health check period.")
    stuck_prompt_s: float | None = Field(
        None, description="A prompt running longer than this makes the container sick; default job_timeout_s."
    )
    memory_growth_limit_mib: int | None = Field(
        8192, description="Growth of a ComfyUI's memory since its first job that makes the container sick."
    )
    housekeeping_period_s: int = Field(
        60, description="Period of the scheduled reaper/dispatcher/webhook sender (each run lasts this long)."
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="COMFYFLEET_", env_nested_delimiter="__", env_file=None, extra="ignore"
    )

    env: Environment = "dev"
    data_dir: Path = Field(Path(".comfyfleet"), description="Embedded data: SQLite file, local storage.")
    database_url: str | None = Field(
        None, description="SQLAlchemy async URL; default sqlite+aiosqlite under data_dir."
    )
    public_base_url: str | None = Field(
        None, description="Base of absolute URLs in responses; default: built from the request's Host."
    )

    # Secrets. Outside env=dev, empty or placeholder values stop the service at start.
    key_pepper: SecretStr = Field(SecretStr(""), description="HMAC key for API key digests.")
    url_signing_key: SecretStr = Field(SecretStr(""), description="HMAC key for local download URLs.")
    webhook_encryption_key: SecretStr = Field(
        SecretStr(""), description="Key that encrypts webhook signing secrets at rest."
    )

    # API.
    max_body_bytes: int = Field(2 * 1024 * 1024, description="Largest JSON request body.")
    auth_cache_ttl_s: float = Field(2.0, description="How long a verified key is trusted without a lookup.")
    idempotency_ttl_s: int = 86400
    list_max_limit: int = 100
    metadata_max_pairs: int = 16

    # Queue and workers.
    dispatch: Literal["local", "modal", "none"] = "local"
    worker_slots: int = Field(1, description="Local worker loops (one per ComfyUI slot).")
    lease_s: float = Field(30.0, description="A running job's lease; heartbeats renew it.")
    heartbeat_s: float = Field(5.0, description="How often a worker renews its lease.")
    reaper_interval_s: float = 5.0
    cancel_poll_s: float = Field(0.1, description="Worker-side cancel check when no push arrives.")
    progress_interval_s: float = Field(0.5, description="Progress snapshots written at most this often.")
    plans: dict[str, PlanLimits] = Field(default_factory=default_plans)

    # ComfyUI.
    comfyui_url: str | None = None
    comfyui_dir: Path | None = None
    comfyui_python: str = "python"
    comfyui_base_port: int = 8288
    comfyui_slot_env: dict[str, str] = Field(
        default_factory=lambda: {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    )
    comfyui_gpus: list[int] | None = None
    comfyui_slots_per_gpu: int = 1
    comfyui_use_mps: bool = False
    comfyui_cancel_grace_s: float = Field(10.0, description="Restart a slot that ignores an interrupt.")
    node_allow: list[str] | None = Field(None, description="Allowed node classes; default: the catalog.")
    node_deny: list[str] = Field(default_factory=list, description="Denied on top of the built-in list.")

    # Storage.
    storage: Literal["local", "s3"] = "local"
    s3_bucket: str = "comfyfleet"
    s3_endpoint_url: str | None = None
    s3_region: str = "auto"
    s3_access_key_id: SecretStr = SecretStr("")
    s3_secret_access_key: SecretStr = SecretStr("")
    s3_addressing_style: Literal["auto", "path", "virtual"] = "path"
    url_lifetime_s: int = Field(900, description="Lifetime of signed download URLs.")
    inline_max_bytes: int = Field(256 * 1024, description="Largest output served inline on request.")
    storage_retries: int = 4

    # Security.
    allow_loopback_urls: bool = Field(False, description="Test switch; refused outside dev/test.")
    url_allowed_ports: list[int] = Field(default_factory=lambda: [80, 443])
    url_allowed_domains: list[str] | None = Field(None, description="Deployment-wide URL allowlist.")
    media_max_bytes: int = 256 * 1024 * 1024
    rate_limit_storage: str = Field(
        "memory://", description="limits storage URI: memory:// (one process) or redis://host:6379"
    )
    auth_failure_rate: str = Field("30/minute", description="Failed authentications per client address.")
    webhook_timeout_s: float = 15.0

    modal: ModalSettings = Field(default_factory=ModalSettings)

    @model_validator(mode="after")
    def _plans_not_empty(self) -> Settings:
        if not self.plans:
            raise ValueError("at least one plan must be configured")
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'comfyfleet.db').resolve()}"

    def plan(self, name: str) -> PlanLimits:
        return self.plans.get(name) or next(iter(self.plans.values()))

    def startup_problems(self) -> list[str]:
        """Why this configuration must not serve, outside dev. Empty when it may."""
        problems: list[str] = []
        if self.allow_loopback_urls and self.env not in ("dev", "test"):
            problems.append("allow_loopback_urls is a test switch and is refused outside dev/test")
        if self.env == "dev":
            return problems
        secrets = {
            "key_pepper": self.key_pepper,
            "url_signing_key": self.url_signing_key,
            "webhook_encryption_key": self.webhook_encryption_key,
        }
        if self.storage == "s3":
            secrets["s3_secret_access_key"] = self.s3_secret_access_key
        for name, value in secrets.items():
            if is_placeholder(value.get_secret_value()):
                problems.append(f"COMFYFLEET_{name.upper()} is empty or a placeholder")
        return problems

    def secret_bytes(self, name: Literal["key_pepper", "url_signing_key", "webhook_encryption_key"]) -> bytes:
        """A secret as bytes; in dev an empty one falls back to a fixed, clearly-labelled dev value."""
        value: str = getattr(self, name).get_secret_value()
        return (value or f"dev-only-{name}").encode()


def is_placeholder(value: str) -> bool:
    lowered = value.strip().lower()
    return len(lowered) < 16 or any(marker in lowered for marker in PLACEHOLDER_MARKERS)


class ConfigurationError(RuntimeError):
    pass


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def render_env_example() -> str:
    """``.env.example`` made from the model: every variable, its default, and what it is for."""
    lines = [
        "# Generated by `comfyfleet config example` from comfyfleet.config.Settings. Do not edit by hand.",
        "# Secrets are left empty: outside COMFYFLEET_ENV=dev the service refuses to start without them.",
        "",
    ]
    defaults = Settings.model_construct()
    for name, field in Settings.model_fields.items():
        if field.description:
            lines.append(f"# {field.description}")
        value = getattr(defaults, name)
        lines.append(f"COMFYFLEET_{name.upper()}={_env_value(value)}")
    return "\n".join(lines) + "\n"


def _env_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return ""
    if value is None:
        return ""
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    if isinstance(value, dict):
        import json

        return json.dumps(
            {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in value.items()},
            separators=(",", ":"),
        )
    if isinstance(value, list):
        import json

        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
