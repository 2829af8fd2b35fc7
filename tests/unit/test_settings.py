"""Settings: .env.example is generated from the model; placeholder secrets stop the service outside dev."""

from __future__ import annotations

from pathlib import Path

import pytest

from comfyfleet.api.app import create_app
from comfyfleet.config import ConfigurationError, Settings, render_env_example

ROOT = Path(__file__).resolve().parents[2]
STRONG = "s3cr3t-0f-sufficient-length-for-prod-use"


def test_env_example_matches_the_settings_model() -> None:
    assert (ROOT / ".env.example").read_text() == render_env_example(), (
        "regenerate it: comfyfleet config example --write .env.example"
    )


def test_every_variable_in_env_example_is_read_by_the_model() -> None:
    names = {
        line.split("=", 1)[0]
        for line in render_env_example().splitlines()
        if line and not line.startswith("#")
    }
    assert names == {f"COMFYFLEET_{name.upper()}" for name in Settings.model_fields}


@pytest.mark.parametrize("env", ["test", "prod"])
@pytest.mark.parametrize("value", ["", "change-me", "placeholder-secret-value", "short"])
def test_placeholder_secrets_are_refused_outside_dev(env: str, value: str) -> None:
    settings = Settings(env=env, key_pepper=value, url_signing_key=STRONG, webhook_encryption_key=STRONG)  # type: ignore[arg-type]
    assert settings.startup_problems()
    with pytest.raises(ConfigurationError, match="COMFYFLEET_KEY_PEPPER"):
        create_app(settings)


def test_dev_starts_without_secrets_and_prod_with_real_ones() -> None:
    assert Settings(env="dev").startup_problems() == []
    prod = Settings(env="prod", key_pepper=STRONG, url_signing_key=STRONG, webhook_encryption_key=STRONG)  # type: ignore[arg-type]
    assert prod.startup_problems() == []


def test_the_loopback_switch_is_refused_outside_dev_and_test() -> None:
    prod = Settings(
        env="prod",
        key_pepper=STRONG,
        url_signing_key=STRONG,
        webhook_encryption_key=STRONG,
        allow_loopback_urls=True,  # type: ignore[arg-type]
    )
    assert any("allow_loopback_urls" in p for p in prod.startup_problems())
    assert (
        Settings(
            env="test",
            allow_loopback_urls=True,
            key_pepper=STRONG,
            url_signing_key=STRONG,  # type: ignore[arg-type]
            webhook_encryption_key=STRONG,
        ).startup_problems()
        == []
    )


def test_secrets_never_show_in_reprs() -> None:
    settings = Settings(key_pepper=STRONG)  # type: ignore[arg-type]
    assert STRONG not in repr(settings) and STRONG not in str(settings.model_dump())


def test_nested_and_json_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFYFLEET_MODAL__GPUS", '["H100","L4"]')
    monkeypatch.setenv("COMFYFLEET_PLANS", '{"solo": {"max_running": 3}}')
    settings = Settings()
    assert settings.modal.gpus == ["H100", "L4"]
    assert settings.plan("solo").max_running == 3
