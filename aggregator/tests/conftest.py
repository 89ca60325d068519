"""Test harness: a private dbus-daemon per test session (per xdist worker), helpers for independent clients and
subprocesses, a marker per folder, and a state root of the session's own.

Async tests are plain `async def` functions; the hook below runs each in a fresh event loop with a timeout,
so no plugin is needed. The folders say what the tests need, and each folder is a marker: pure (values in, values
out), bus (a private dbus-daemon and real services on it), mqtt (a real mosquitto too), browser (Chromium),
install (the installer in a fake root). `pytest aggregator/tests/pure` or `-m pure` is the fast suite.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from aggregator.config import STATE_ROOT_ENV, Config
from aggregator_dev.privatebus import PrivateBus

REPO = Path(__file__).resolve().parents[2]
ASYNC_TIMEOUT = 60.0
FOLDERS = ("pure", "bus", "mqtt", "browser", "install")
# The default stateDir stands for the production one (on a GX it holds the real learned shares, energy and the
# cooperative's ledger). The session gets a root of its own for it, which the config's default follows (and the
# processes the tests start inherit), so the guard below never looks at the machine's /data, and another process
# on the machine cannot fail our tests. No test may write there; every test gives its configs a stateDir under
# tmp_path.
os.environ[STATE_ROOT_ENV] = tempfile.mkdtemp(prefix="battery-aggregator-state-root-")
PRODUCTION_STATE_DIR = Path(Config().stateDir)


def _snapshot(root: Path) -> dict[str, tuple[int, int]] | None:
    """Every entry under root with its mtime and size; None when root does not exist. Directories count too:
    StateStore's atomic replace changes its directory's mtime even when the file ends up the same size."""
    if not root.exists():
        return None
    out: dict[str, tuple[int, int]] = {}
    for directory, dirs, files in os.walk(root):
        for path in [directory, *(os.path.join(directory, name) for name in [*dirs, *files])]:
            try:
                st = os.lstat(path)
            except OSError:  # vanished between the listing and the stat: that is a change too
                out[path] = (-1, -1)
            else:
                out[path] = (st.st_mtime_ns, st.st_size)
    return out


def _changes(before: dict[str, tuple[int, int]] | None, after: dict[str, tuple[int, int]] | None) -> list[str]:
    if before == after:
        return []
    if before is None:
        return [f"created {PRODUCTION_STATE_DIR}: " + ", ".join(sorted(after or {})[:10])]
    if after is None:
        return [f"removed {PRODUCTION_STATE_DIR}"]
    return sorted(f"{'changed' if p in before and p in after else 'added' if p in after else 'removed'} {p}"
                  for p in set(before) | set(after) if before.get(p) != after.get(p))


_session_baseline: dict[str, tuple[int, int]] | None = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test's folder is its marker (registered in pyproject.toml)."""
    for item in items:
        folder = item.path.parent.name
        if folder in FOLDERS:
            item.add_marker(folder)


def pytest_sessionstart(session: pytest.Session) -> None:
    global _session_baseline
    _session_baseline = _snapshot(PRODUCTION_STATE_DIR)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the last teardown: catches a subprocess that outlived its test and wrote there late."""
    changes = _changes(_session_baseline, _snapshot(PRODUCTION_STATE_DIR))
    if changes:
        sys.stderr.write("\nFAILED: the tests wrote into the default stateDir (the production one's stand-in) "
                         f"{PRODUCTION_STATE_DIR}:\n  " + "\n  ".join(changes) + "\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    shutil.rmtree(os.environ[STATE_ROOT_ENV], ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_writes_to_the_production_state_dir() -> Iterator[None]:
    """Fails the test (at teardown, after its subprocesses were stopped) that wrote into the production
    stateDir. Autouse fixtures are set up first and torn down last, so `processes` has stopped by then."""
    before = _snapshot(PRODUCTION_STATE_DIR)
    yield
    changes = _changes(before, _snapshot(PRODUCTION_STATE_DIR))
    if changes:
        pytest.fail("this test wrote into the default stateDir (the production one's stand-in) "
                    f"{PRODUCTION_STATE_DIR} (give its config a stateDir under tmp_path):\n  "
                    + "\n  ".join(changes[:20]), pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**args), ASYNC_TIMEOUT))
    return True


@pytest.fixture(scope="session")
def private_bus() -> Iterator[PrivateBus]:
    """One dbus-daemon for the session; DBUS_SESSION_BUS_ADDRESS points to it (as Victron's tools expect)."""
    old = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    with PrivateBus() as bus:
        os.environ["DBUS_SESSION_BUS_ADDRESS"] = bus.address
        try:
            yield bus
        finally:
            if old is None:
                os.environ.pop("DBUS_SESSION_BUS_ADDRESS", None)
            else:
                os.environ["DBUS_SESSION_BUS_ADDRESS"] = old


@pytest.fixture
def bus_address(private_bus: PrivateBus) -> str:
    return private_bus.address


class Busctl:
    """busctl, an independent D-Bus client (systemd's), pointed at the private bus."""

    def __init__(self, address: str) -> None:
        self.address = address

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["busctl", f"--address={self.address}", *args], capture_output=True, text=True,
                                timeout=20)
        if check and result.returncode != 0:
            raise AssertionError(f"busctl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def call_json(self, service: str, path: str, member: str, *sig_and_args: str,
                  interface: str = "com.victronenergy.BusItem") -> Any:
        """The reply as busctl's JSON: {"type": signature, "data": [values]}."""
        out = self.run("--json=short", "call", service, path, interface, member, *sig_and_args).stdout
        return json.loads(out)

    async def acall_json(self, *args: str, **kwargs: str) -> Any:
        """The same, off the event loop (our service must keep answering while busctl waits)."""
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self.call_json(*args, **kwargs))

    async def arun(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self.run(*args, check=check))


@pytest.fixture
def busctl(bus_address: str) -> Busctl:
    return Busctl(bus_address)


class Processes:
    """Subprocesses of `python -m aggregator ...` (or another module) on the private bus, stopped at teardown."""

    def __init__(self, address: str, tmp: Path) -> None:
        self.address = address
        self.tmp = tmp
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        if args[:1] == ("run",) and "--config" in args:
            _assert_state_dir_is_set(Path(args[args.index("--config") + 1]))
        return self.start_module("aggregator", *args, env=env)

    def start_module(self, module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """`python -m module args...` (a simulator, a service run alone)."""
        full_env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=self.address, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        log = open(self.tmp / f"proc{len(self.procs)}.log", "w+")
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=full_env,
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        proc.log = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    @staticmethod
    def output(proc: subprocess.Popen[str]) -> str:
        log = proc.log  # type: ignore[attr-defined]
        log.flush()
        log.seek(0)
        return log.read()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.log.close()  # type: ignore[attr-defined]


def _assert_state_dir_is_set(config: Path) -> None:
    """Before the daemon starts: a config without stateDir would make it write into the production one (a
    config that is not an object is left to the daemon's error handling, and to the guard above)."""
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and "stateDir" not in data:
        raise AssertionError(f"{config} has no stateDir: the daemon would keep its state in "
                             f"{PRODUCTION_STATE_DIR}; give it one under tmp_path")


@pytest.fixture
def processes(bus_address: str, tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(bus_address, tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()
