"""The whole check, as `make test` and CI run it: lint, types, secret scan, then the test suite.
Exits non-zero on the first failing step; a test run that collects nothing fails too."""

from __future__ import annotations

import os
import subprocess
import sys

BIN = os.path.dirname(sys.executable)


def run(name: str, argv: list[str]) -> None:
    print(f"== {name}: {' '.join(argv)}", flush=True)
    code = subprocess.call(argv)
    if code != 0:
        if name == "tests" and code == 5:
            print("== tests: no tests were collected; that is a failure", flush=True)
        sys.exit(code or 1)


def main() -> None:
    run("ruff", [f"{BIN}/ruff", "check", "src", "tests", "bench", "scripts"])
    run("mypy", [f"{BIN}/mypy"])
    run("secrets", [sys.executable, "-m", "scripts.secret_scan"])
    run("tests", [sys.executable, "-m", "pytest", "-q", *sys.argv[1:]])


if __name__ == "__main__":
    main()
