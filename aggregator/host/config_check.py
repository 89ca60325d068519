"""The service's config check, in a child interpreter: the model (pydantic) is loaded there and not in the service.

    python -m aggregator.host.config_check PATH   ->   one JSON line on stdout: {"config": <the checked
    config, every key> or null, "document": <what the file set>, "errors": [...], "warnings": [...]}

The service reads the answer with `check_in_child`; a missing file at the default path means all defaults.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from ..config_data import DEFAULT_CONFIG_PATH, CheckResult, config_data

CHECK_TIMEOUT = 300.0  # seconds: pydantic's import takes a few on a slow GX; an answer never takes this long
ANSWER_LIMIT = 4 << 20  # bytes of answer read at most: a config is a few kB


def check_in_child(path: str) -> CheckResult:
    """Check `path` in a child interpreter; never raises (a failed check is a CheckResult with the error)."""
    try:
        # Its bytecode is cached as the service's is: on a GX, compiling the model's library anew at every
        # check would take seconds.
        done = subprocess.run([sys.executable, "-m", __name__, path], capture_output=True, timeout=CHECK_TIMEOUT,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CheckResult(None, [f"cannot check the config {path}: {exc}"], [])
    try:
        answer = json.loads(done.stdout[:ANSWER_LIMIT])
        config = answer["config"]
        errors, warnings = [str(e) for e in answer["errors"]], [str(w) for w in answer["warnings"]]
    except (ValueError, KeyError, TypeError):
        why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return CheckResult(None, [f"cannot check the config {path}: {why[0][:300]}"], [])
    return CheckResult(None if config is None else config_data(config), errors, warnings, answer.get("document"))


def load(path: str | None) -> tuple[CheckResult, str]:
    """The config to run with, and where it came from. A missing default file means all defaults."""
    path = path or DEFAULT_CONFIG_PATH
    source = "defaults" if not os.path.exists(path) and path == DEFAULT_CONFIG_PATH else path
    return check_in_child(path), source


def load_first(path: str | None) -> tuple[CheckResult, str]:
    """The service's first config, before anything loads asyncio: it decides what the process leaves out."""
    from .lean import leave_out_tls

    result, source = load(path)
    if result.config is not None:
        leave_out_tls(result.config)
    return result, source


def _answer(path: str) -> dict[str, Any]:
    from ..config import Config, check_config_file

    if path == DEFAULT_CONFIG_PATH and not os.path.exists(path):
        return {"config": Config().model_dump(mode="json"), "document": None, "errors": [], "warnings": []}
    result = check_config_file(path)
    config = None if result.config is None else result.config.model_dump(mode="json")
    return {"config": config, "document": result.document, "errors": result.errors, "warnings": result.warnings}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m aggregator.host.config_check PATH", file=sys.stderr)
        return 2
    print(json.dumps(_answer(argv[0]), allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
