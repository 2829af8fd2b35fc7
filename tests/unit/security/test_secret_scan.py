"""The CI secret scan knows our key format: a planted key in a test file fails the scan, and the
committed tree passes it. The key is generated here at run time, so none is ever committed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from comfyfleet.tenants.keys import generate_key

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("env", ["dev", "test", "prod"])
def test_a_planted_api_key_fails_the_scan(env: str) -> None:
    planted = ROOT / "tests" / f"_planted_key_{env}_test.py"
    planted.write_text(f'API_KEY = "{generate_key(env, b"pepper").plaintext}"\n')
    try:
        result = subprocess.run(
            [sys.executable, "-m", "scripts.secret_scan", str(planted.relative_to(ROOT))],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    finally:
        planted.unlink()
    assert result.returncode != 0
    assert "comfyfleet API key" in result.stdout + result.stderr


def test_the_committed_tree_passes_the_scan() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scripts.secret_scan"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
