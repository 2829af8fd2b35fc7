"""Which real services this machine has. Missing ones skip their tests with a reason, except under
CI=true, where a missing service is an error."""

from __future__ import annotations

import os
import socket

import pytest

PG_HOST, PG_PORT = os.environ.get("COMFYFLEET_TEST_PG_HOST", "127.0.0.1"), 5432
REDIS_URL = os.environ.get("COMFYFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require(name: str, available: bool) -> None:
    if available:
        return
    message = f"{name} is not reachable on this machine"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}, and CI=true requires it", pytrace=False)
    pytest.skip(f"{message}; start it to run these tests")
