"""`battery-aggregator demo`: a private bus, localsettings, the simulated bank and the aggregator, live.

Everything runs on a private dbus-daemon, so the demo never touches the machine's buses; every process it
starts is stopped when it ends (Ctrl-C, or after --duration seconds).
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from .bus.lib import connect
from .bus.monitor import ServiceMonitor, WatchedService
from .liveview import render
from .privatebus import PrivateBus
from .simulator.bus_bank import BATTERY_PREFIX, CONTROL_SERVICE

# The aggregate of the bank, and Pack C behind a virtual battery whose hook caps its charge current by
# voltage (how users tame a BMS that asks for too much near full).
DEMO_CONFIG = {
    "serviceName": "com.victronenergy.battery.aggregator",
    "reconnectTimeout": 30,
    "startupBatteryWait": 10,
    "expectedBatteries": 3,
    "virtualBatteries": {
        "com.victronenergy.battery.virtual_c": ["class:hooks.CustomChargingHook#c", "com.victronenergy.battery.sim_c"],
    },
    "classes": {"hooks.CustomChargingHook#c": {"ccls": {"0": 40, "54.4": 20, "55.2": 5}}},
    # The grid as a battery, fed by the simulated meter below. Its clock is the wall clock while the meter's
    # runs GRID_TIME_SCALE times faster, so the meter's power limit is set out of the way.
    "gridBatteries": [{"meter": "com.victronenergy.grid.demo", "capacityKwh": 40, "startDate": "2020-01-01",
                       "serviceName": "com.victronenergy.battery.grid", "maxPowerKw": 100000}],
}
GRID_TIME_SCALE = 600.0  # a simulated day in 2.4 minutes
GRID_SOLAR_PEAK_W = 12000.0  # enough to export in winter too


class _Children:
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, label: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{label}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs.append((label, proc))
        return proc

    def dead(self) -> list[str]:
        return [label for label, proc in self.procs if proc.poll() is not None]

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _live(address: str, children: _Children, duration: float | None, refresh: float, workdir: Path) -> int:
    bus = await connect(address)
    last_update: dict[str, float] = {}

    def touched(service: WatchedService, *_: Any) -> None:
        last_update[service.name] = time.monotonic()

    batteries = ServiceMonitor(bus, [BATTERY_PREFIX], on_added=touched, on_changed=touched)
    control = ServiceMonitor(bus, [CONTROL_SERVICE], require_device_instance=False)
    await batteries.start()
    await control.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tty = sys.stdout.isatty()
    started = time.monotonic()
    footer = "\n".join(["", f"Logs in {workdir}.", *status_hint(address)])
    while not stop.is_set():
        bank = control.services.get(CONTROL_SERVICE)
        dead = children.dead()
        title = (f"battery-aggregator demo — private bus, {len(batteries.services)} battery services"
                 f"{' — STOPPED: ' + ', '.join(dead) if dead else ''} — Ctrl-C to quit")
        screen = render(batteries.services.values(), last_update, bank.values if bank else None, title)
        sys.stdout.write(("\x1b[H\x1b[2J" if tty else "\n") + screen + "\n" + footer + "\n")
        sys.stdout.flush()
        if duration is not None and time.monotonic() - started >= duration:
            break
        try:
            await asyncio.wait_for(stop.wait(), refresh)
        except asyncio.TimeoutError:
            pass
    await batteries.stop()
    await control.stop()
    bus.disconnect()
    return 0


def cli_command() -> str:
    """How to run this installation's command line from the current directory."""
    script = Path(sys.executable).with_name("battery-aggregator")
    if not script.exists():
        return shlex.join([sys.executable, "-m", "aggregator"])
    found = shutil.which("battery-aggregator")
    if found and Path(found).resolve() == script.resolve():
        return "battery-aggregator"
    try:
        relative = script.relative_to(Path.cwd())
        return shlex.quote(str(relative) if len(relative.parts) > 1 else f"./{relative}")
    except ValueError:
        return shlex.quote(str(script))


def status_hint(address: str) -> list[str]:
    """The demo's bus is private: how to read it from another shell with `status` (and dump, check --live)."""
    bus = address.split(",guid=", 1)[0]  # the guid only pins the server: not needed to connect
    return ["Read it as on a GX, from another shell (status, dump, check --live):",
            f"  export DBUS_SESSION_BUS_ADDRESS={shlex.quote(bus)}",
            f"  {cli_command()} status"]


def main(scenario: str = "default", duration: float | None = None, refresh: float = 1.0) -> int:
    try:
        private_bus = PrivateBus()
        address = private_bus.start()
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="battagg-demo-"))
    config = dict(DEMO_CONFIG, stateDir=str(workdir / "state"))  # never the GX's /data in a demo
    (workdir / "config.json").write_text(json.dumps(config, indent=2))
    env = private_bus.env()
    env["PYTHONUNBUFFERED"] = "1"
    repo_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo_root + os.pathsep + env.get("PYTHONPATH", "")
    children = _Children(workdir, env)
    try:
        children.start("localsettings", "aggregator.simulator.localsettings", "--store", str(workdir / "settings.json"))
        children.start("simulator", "aggregator", "simulate", scenario)
        morning = datetime.now().replace(hour=8, minute=0, second=0, microsecond=0).isoformat()
        children.start("grid-meter", "aggregator.simulator.grid_meter", "--name", "demo", "--time-scale",
                       str(GRID_TIME_SCALE), "--start", morning, "--solar-peak", str(GRID_SOLAR_PEAK_W))
        children.start("aggregator", "aggregator", "run", "--config", str(workdir / "config.json"))
        return asyncio.run(_live(address, children, duration, refresh, workdir))
    except KeyboardInterrupt:
        return 0
    finally:
        children.stop()
        private_bus.stop()
        print(f"demo stopped; logs kept in {workdir}")
