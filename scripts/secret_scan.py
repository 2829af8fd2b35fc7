"""Secret scan: detect-secrets over every tracked file, against the committed baseline
(.secrets.baseline). A finding that is not in the baseline fails. Our own key formats are known to
the scan through scripts/secret_plugins/comfyfleet.py.

    python -m scripts.secret_scan            # scan tracked files
    python -m scripts.secret_scan FILE...    # scan these files (the scan's own test uses this)
    python -m scripts.secret_scan --update   # rewrite the baseline after reviewing its findings
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / ".secrets.baseline"
PLUGIN = ROOT / "scripts" / "secret_plugins" / "comfyfleet.py"
BIN = os.path.dirname(sys.executable)
# Lock files hold hashes, and the recorded ComfyUI transcripts prompt and client ids: they look like
# secrets and carry none.
EXCLUDE = r"(^|/)(requirements.*\.lock|\.secrets\.baseline)$|^tests/fakes/transcripts/"


def tracked_files() -> list[str]:
    output = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line for line in output.splitlines() if line and (ROOT / line).is_file()]


def scan(files: list[str]) -> int:
    argv = [
        f"{BIN}/detect-secrets-hook",
        "--baseline",
        str(BASELINE),
        "-p",
        str(PLUGIN),
        "--exclude-files",
        EXCLUDE,
        *files,
    ]
    return subprocess.call(argv, cwd=ROOT)


def update_baseline() -> int:
    argv = [f"{BIN}/detect-secrets", "scan", "-p", str(PLUGIN), "--exclude-files", EXCLUDE]
    output = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    baseline = json.loads(output)
    # The custom plugins are passed with -p on every run; an absolute path in the baseline would tie
    # it to one checkout.
    baseline["plugins_used"] = [p for p in baseline["plugins_used"] if "path" not in p]
    baseline.pop("generated_at", None)
    BASELINE.write_text(json.dumps(baseline, indent=2, sort_keys=True) + "\n")
    return 0


def main(args: list[str]) -> int:
    if args[:1] == ["--update"]:
        return update_baseline()
    code = scan(args or tracked_files())
    if code != 0:
        print(
            "secret scan: a new secret-like string was found (see above); remove it, or review it "
            "and run `python -m scripts.secret_scan --update` if it is not a secret",
            file=sys.stderr,
        )
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
