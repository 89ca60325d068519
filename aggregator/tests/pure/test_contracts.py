"""The shape of the package holds itself: import contracts (pyproject's [tool.importlinter]), cores that load no bus
when imported, sizes of modules and functions, mypy on the cores, ruff."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import REPO

BIN = Path(sys.executable).parent
# The pure cores: values in, values out (the same list as the first import contract and mypy's files).
CORES = [
    "aggregator.battery.paths", "aggregator.battery.sanitize", "aggregator.battery.membership",
    "aggregator.battery.identity", "aggregator.battery.merge", "aggregator.battery.hooks", "aggregator.battery.virtual",
    "aggregator.limits.formulas", "aggregator.limits.shares", "aggregator.limits.ir", "aggregator.limits.controller",
    "aggregator.limits.forbidding", "aggregator.limits.signs", "aggregator.features.energy.core",
    "aggregator.features.grid_battery.core", "aggregator.features.dispatcher.core.model",
    "aggregator.features.dispatcher.core.controller", "aggregator.features.dispatcher.core.faults",
    "aggregator.features.dispatcher.core.windows", "aggregator.features.dispatcher.core.dynamics",
    "aggregator.features.dispatcher.core.target", "aggregator.features.coop.core", "aggregator.features.coop.ledger",
    "aggregator.bounded", "aggregator.local_time", "aggregator.numbers",
]
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
# Exceptions, each at most its present size (it may shrink, never grow); none today.
LARGER_MODULES: dict[str, int] = {}
LONGER_FUNCTIONS: dict[str, int] = {}


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed: ./run.sh setup installs the test dependencies")
    return str(path)


def test_the_import_contracts_are_kept() -> None:
    """pyproject's contracts: cores load no bus, asyncio, pydantic or file I/O; features do not import each other;
    the service does not import the development tools; the cores know no feature and no host."""
    result = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_importing_a_core_loads_no_bus_no_asyncio_and_no_pydantic() -> None:
    """At run time too (a type-only import of the config is fine: it is not executed)."""
    code = ("import importlib, json, sys\n"
            f"for name in {CORES!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('dbus_next', 'dbus_fast', 'asyncio', 'pydantic', 'aiomqtt') or m.startswith('aggregator.bus'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def _sources() -> list[Path]:
    return sorted(p for top in ("aggregator", "aggregator_dev") for p in (REPO / top).rglob("*.py")
                  if "tests" not in p.relative_to(REPO).parts)


def test_modules_and_functions_stay_small() -> None:
    too_large = []
    for path in _sources():
        name = path.relative_to(REPO).as_posix()
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > LARGER_MODULES.get(name, MAX_MODULE_LINES):
            too_large.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > LONGER_FUNCTIONS.get(f"{name}:{node.name}", MAX_FUNCTION_LINES):
                    too_large.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert not too_large, f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function: {too_large}"


def test_the_allowances_name_only_what_exists() -> None:
    """An allowance left behind after a split would let the next module grow unseen."""
    names = {p.relative_to(REPO).as_posix() for p in _sources()}
    assert set(LARGER_MODULES) <= names
    assert {f.split(":")[0] for f in LONGER_FUNCTIONS} <= names


def test_mypy_finds_nothing_in_the_cores() -> None:
    result = subprocess.run([_tool("mypy")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]


def test_ruff_finds_nothing() -> None:
    result = subprocess.run([_tool("ruff"), "check", "--no-cache", "aggregator", "aggregator_dev"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]


def test_the_mqtt_link_loads_no_pydantic() -> None:
    """The link reads a feature's broker settings through a Protocol: the settings model stays with the config."""
    code = ("import json, sys\nimport aggregator.mqtt.link, aggregator.mqtt.hass\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'pydantic' or "
            "m in ('aggregator.mqtt.settings', 'aggregator.config'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
