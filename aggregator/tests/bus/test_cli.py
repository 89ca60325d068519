"""The command line: help, the run command's config handling and watcher, and the demo end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..conftest import REPO, Processes
from ..helpers import eventually


def _cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aggregator", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env)


def test_help_explains_each_command() -> None:
    out = _cli("--help").stdout
    for command in ("run", "simulate", "demo", "fault"):
        assert command in out
    assert "private dbus-daemon" in _cli("demo", "--help").stdout
    assert "SCENARIO" in _cli("simulate", "--help").stdout


def test_the_development_commands_say_they_are_not_installed_where_the_dev_tools_are_not() -> None:
    """A GX install ships the service, not aggregator_dev: simulate, fault and demo say so instead of a traceback."""
    for command in (["simulate"], ["fault", "0", "quiet"], ["demo", "--duration", "1"]):
        code = ("import sys; sys.modules['aggregator_dev'] = None; from aggregator.cli import main; "
                f"raise SystemExit(main({command!r}))")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "a development tool, not part of this install" in result.stderr
        assert "Traceback" not in result.stderr


def test_simulate_help_names_every_bundled_scenario() -> None:
    from aggregator_dev.simulator.scenario import available_scenarios

    text = " ".join(_cli("simulate", "--help").stdout.split())
    missing = [name for name in available_scenarios() if name not in text]
    assert not missing, missing


def test_run_refuses_a_bad_config_naming_key_and_value(tmp_path: Path) -> None:
    bad = {"value.json": json.dumps({"currentRatioMethod": "magic", "reconnectTimeout": 30}),
           "duplicate.json": '{"logLevel": "INFO", "logLevel": "DEBUG"}',
           "syntax.json": '{"logLevel": "INFO",\n "capacity": }'}
    runs = {}
    for name, text in bad.items():  # the three processes at once: each is mostly Python starting up
        (tmp_path / name).write_text(text)
        runs[name] = subprocess.Popen([sys.executable, "-m", "aggregator", "run", "--config", str(tmp_path / name),
                                       "--exit-delay", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=REPO)
    results = {}
    for name, proc in runs.items():
        stderr = proc.communicate(timeout=60)[1]
        results[name] = (proc.returncode, stderr)
    code, stderr = results["value.json"]
    assert code == 1
    assert "currentRatioMethod" in stderr and "'magic'" in stderr
    assert "'ir'" in stderr  # what is allowed
    code, stderr = results["duplicate.json"]
    assert code == 1 and "duplicate key 'logLevel'" in stderr
    code, stderr = results["syntax.json"]
    assert code == 1 and "line 2" in stderr


async def test_run_aggregates_members_but_not_excluded_ones(processes: Processes, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"serviceName": "com.victronenergy.battery.aggregator",
                                  "excludedServices": ["com.victronenergy.battery.sim_b"],
                                  "stateDir": str(tmp_path / "state")}))
    sim = processes.start("simulate", "default", "--rate", "2")
    daemon = processes.start("run", "--config", str(config), "--log-level", "INFO")

    def seen() -> bool:  # all three classified: the packs appear in any order, sim_b possibly last
        log = processes.output(daemon)
        return ("member com.victronenergy.battery.sim_a (" in log and "member com.victronenergy.battery.sim_c (" in log
                and "com.victronenergy.battery.sim_b is excluded" in log)

    await eventually(seen, timeout=20, interval=0.2)
    assert "member com.victronenergy.battery.sim_b" not in processes.output(daemon)
    # Members misbehaving never stop it: kill the simulator outright.
    sim.kill()
    await eventually(lambda: "member com.victronenergy.battery.sim_a left the bus" in processes.output(daemon),
                     timeout=10, interval=0.2)
    assert daemon.poll() is None
    daemon.terminate()
    assert daemon.wait(timeout=10) == 0


def test_demo_shows_the_bank_live_and_cleans_up(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)  # the demo makes its own bus
    result = _cli("demo", "--duration", "5", "--refresh", "0.5", env=env, timeout=90)
    assert result.returncode == 0, result.stderr
    frames = result.stdout.split("battery-aggregator demo")
    last = frames[-1]
    for pack in ("battery.sim_a", "battery.sim_b", "battery.sim_c"):
        assert pack in last, last
    assert "Simulator (the physical truth)" in last
    assert "STOPPED" not in result.stdout  # no child died
    # Every process it started is gone: none still has the demo's bus socket directory open.
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], leftovers
    logs = next(tmp_path.glob("battagg-demo-*"))
    assert "member com.victronenergy.battery.sim_a (" in (logs / "aggregator.log").read_text()


def test_the_demo_shows_a_quiet_bank_online_as_the_aggregate_does(tmp_path: Path) -> None:
    """Victron services signal only changes: the demo's own table marked every pack of a bank at rest stale after
    5 s without a signal. It shows the aggregate's verdict (which asks a quiet member)."""
    import signal
    import time

    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    demo = subprocess.Popen([sys.executable, "-m", "aggregator", "demo", "--scenario", "quiet", "--duration", "60",
                             "--refresh", "0.5"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)

    def online(frame: str) -> bool:
        rows = [line for line in frame.splitlines() if line.startswith("battery.sim_")]
        return len(rows) == 3 and all(row.endswith("online") for row in rows)

    try:
        assert demo.stdout is not None
        frame, first_online, deadline = "", None, time.monotonic() + 60
        # A frame is whole when the next one starts. The quiet packs signal nothing after they joined, so a
        # frame 6 s after the first that shows them online comes more than 5 s after their last signal.
        while first_online is None or time.monotonic() < first_online + 6:
            assert time.monotonic() < deadline, frame
            line = demo.stdout.readline()
            assert line, frame
            if "battery-aggregator demo" not in line:
                frame += line
                continue
            if frame and first_online is None and online(frame):
                first_online = time.monotonic()
            frame = line
        while "battery-aggregator demo" not in (line := demo.stdout.readline()):  # the last frame, whole
            assert line, frame
            frame += line
        assert online(frame), frame
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=30) == 0


def test_the_demo_screen_fits_100_columns() -> None:
    from aggregator.bus.monitor import WatchedService
    from aggregator_dev.liveview import AGGREGATE_PRODUCT, GRID_PRODUCT, VIRTUAL_PRODUCT, render

    def battery(name: str, product: str, **values: object) -> WatchedService:
        return WatchedService(f"com.victronenergy.battery.{name}", ":1.1", 1, {
            "/ProductName": product, "/Soc": 100.0, "/Dc/0/Voltage": 53.2, "/Dc/0/Current": -150.5,
            "/Dc/0/Power": -8006.6, "/Dc/0/Temperature": 45.0, "/Info/MaxChargeCurrent": 1000.0,
            "/Info/MaxDischargeCurrent": 1000.0, "/Info/ChargeMode": "Absorption", **values})

    services = [battery("socketcan_can0_vecan0_di512_uc1234", "Pylontech",
                        **{"/CustomName": "Rack left, upper shelf"}),
                battery("virtual_c", VIRTUAL_PRODUCT), battery("aggregator", AGGREGATE_PRODUCT, **{
                    "/Batteries/0/Service": "com.victronenergy.battery.virtual_c", "/Batteries/0/State": "stale",
                    "/Energy/Status": "ok: 3 batteries counted", "/History/ChargedEnergy": 12345.678,
                    "/History/DischargedEnergy": 12000.5, "/Energy/CapacityWeightedSoc": 55.5,
                    "/Energy/AverageSoc": 56.25}),
                battery("grid", GRID_PRODUCT, **{"/GridBattery/LevelKwh": 12.5, "/GridBattery/Status": "ok"})]
    bank = {"/Bank/Voltage": 53.2, "/Bank/Current": -150.5, "/Bank/RequestedCurrent": -150.5, "/SimTime": 86400,
            "/Packs/sim_a/Fault": "freeze", "/Packs/sim_b/Fault": "absurd", "/Packs/sim_c/Fault": "fets_open"}
    title = ("battery-aggregator demo — private bus, 4 battery services — STOPPED: simulator, grid-meter — "
             "Ctrl-C to quit")
    screen = render(services, bank, title)
    assert max(len(line) for line in screen.splitlines()) <= 100, screen
    rows = [line for line in screen.splitlines() if line.startswith("battery.")]
    assert len(rows) == 4 and all("-8007W" in row and "1000A" in row for row in rows), screen
    states = {row.split()[0]: row.split()[-1] for row in rows}
    assert states == {"battery.socketcan…": "online", "battery.virtual_c": "stale", "battery.aggregator": "online",
                      "battery.grid": "online"}, screen  # the aggregate's word for its members
    assert rows[0].startswith("battery.socketcan… Rack left, upp… ")  # cut, and marked as cut
    assert "Faults: sim_a: freeze, sim_b: absurd, sim_c: fets_open" in screen.replace("\n  ", " ")


def test_the_demo_says_how_to_read_its_bus_and_that_command_works(tmp_path: Path) -> None:
    import re
    import time

    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    demo = subprocess.Popen([sys.executable, "-m", "aggregator", "demo", "--duration", "60", "--refresh", "0.5"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert demo.stdout is not None
        seen = ""
        deadline = time.monotonic() + 30
        while "battery.aggregator " not in seen.rsplit("battery-aggregator demo", 1)[-1]:
            assert time.monotonic() < deadline, seen
            seen += demo.stdout.readline()
        hint = re.search(r"from another shell.*:\n  (export DBUS_SESSION_BUS_ADDRESS=\S+)\n  (.+ status)\n", seen)
        assert hint, seen
        # what a newcomer does: paste the two lines into another shell
        result = subprocess.run(["sh", "-c", f"{hint.group(1)}; {hint.group(2)}"], cwd=REPO, capture_output=True,
                                text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "com.victronenergy.battery.aggregator" in result.stdout and "battery.sim_a" in result.stdout
    finally:
        demo.terminate()
        demo.wait(timeout=20)


def test_commands_without_a_bus_say_which_bus_and_what_to_do(tmp_path: Path) -> None:
    nowhere = f"unix:path={tmp_path}/no-bus"
    for args in (("status",), ("dump", str(tmp_path / "d.json")), ("fault", "sim_a", "freeze")):
        result = _cli(*args, env=dict(os.environ, DBUS_SESSION_BUS_ADDRESS=nowhere))
        assert result.returncode == 1, result
        assert "Traceback" not in result.stderr, result.stderr
        assert f"battery-aggregator {args[0]}: cannot reach the D-Bus at {nowhere}" in result.stderr
        assert "DBUS_SESSION_BUS_ADDRESS the demo shows" in result.stderr
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS="not-an-address")
    result = _cli("status", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "not-an-address" in result.stderr


async def test_status_and_dump_show_the_demo_bank(processes: Processes, tmp_path: Path) -> None:
    import asyncio

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"serviceName": "com.victronenergy.battery.statusagg",
                                  "excludedServices": ["com.victronenergy.battery.aggregator"],
                                  "stateDir": str(tmp_path / "state")}))
    processes.start("simulate", "default", "--rate", "2")
    processes.start("run", "--config", str(config))

    def status_output() -> str:
        result = _cli("status", "--service", "com.victronenergy.battery.statusagg", timeout=30)
        return result.stdout if result.returncode == 0 and "battery.sim_c" in result.stdout else ""

    loop = asyncio.get_running_loop()

    async def ready() -> str:
        return await loop.run_in_executor(None, status_output)

    out = await eventually(ready, timeout=30, interval=0.5)
    for pack in ("battery.sim_a", "battery.sim_b", "battery.sim_c"):
        assert pack in out
    assert "online" in out and "CCL" in out and "charge limit:" in out
    assert "Aggregate of 3 batteries" in out
    dump_file = tmp_path / "dump.json"
    result = await loop.run_in_executor(None, lambda: _cli("dump", str(dump_file), timeout=30))
    assert result.returncode == 0, result.stderr
    data = json.loads(dump_file.read_text())
    assert data["services"]["com.victronenergy.battery.sim_a"]["/ProductName"] == "Simulated LiFePO4"
    assert "com.victronenergy.battery.statusagg" in data["services"]


async def test_log_level_path_shows_the_level_in_force(processes: Processes, tmp_path: Path) -> None:
    from aggregator.bus import client
    from aggregator.bus.lib import connect

    config = tmp_path / "config.json"
    name = "com.victronenergy.battery.loglevelagg"
    config.write_text(json.dumps({"serviceName": name, "startupBatteryWait": 0, "logLevel": "INFO",
                                  "stateDir": str(tmp_path)}))
    processes.start("run", "--config", str(config), "--log-level", "DEBUG")
    bus = await connect()

    async def level() -> object:
        try:
            return await client.get_value(bus, name, "/LogLevel", 2.0)
        except client.CallError:
            return None

    assert await eventually(level, timeout=15) == "DEBUG"
    bus.disconnect()
