"""`battery-aggregator demo`: a private bus, localsettings, the simulated bank and the aggregator, live.

Everything runs on a private dbus-daemon, so the demo never touches the machine's buses; every process it
starts is stopped when it ends (Ctrl-C, or after --duration seconds).

With --all the side features run too, with their live values under the table: energy reports of two
batteries that are not on D-Bus arriving every few seconds, the grid battery, the power dispatcher following
a target that changes every 20 s over two controllable batteries (one gives only 60 % of what it is asked),
and a cooperative of three households, each on a private bus of its own (a GX each: the household simulator
with Victron's system calculator, and the aggregator running the dispatcher and the cooperative), on one
mosquitto. `demo.json` in the demo's directory names the buses and the broker (with a read-only user), so
anyone can look in with busctl, dbus-spy or mosquitto_sub.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from aggregator.bus import client
from aggregator.bus.lib import Variant, connect
from aggregator.bus.monitor import ServiceMonitor
from aggregator.features.energy.runtime import ENERGY_INTERFACE
from .liveview import coop_lines, dispatcher_lines, external_lines, render
from .mqttbroker import MosquittoBroker
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
    # It starts counting at the first sample, from an empty battery (startLevelKwh), as a fresh install would.
    "gridBatteries": [{"meter": "com.victronenergy.grid.demo", "capacityKwh": 40, "startDate": "2020-01-01",
                       "startLevelKwh": 0, "serviceName": "com.victronenergy.battery.grid", "maxPowerKw": 100000}],
}
GRID_TIME_SCALE = 600.0  # a simulated day in 2.4 minutes
GRID_SOLAR_PEAK_W = 12000.0  # enough to export in winter too
AGGREGATE = DEMO_CONFIG["serviceName"]
REPO = Path(__file__).resolve().parents[1]

# --all: the dispatcher over two controllable batteries (not battery services: the bank's aggregate leaves them
# alone). The shed's battery gives 60 % of what it is asked and at most 1500 W; its config promises more.
DISPATCHED = (("garage", ("--gain", "1.0", "--max-charge", "3000", "--max-discharge", "3000", "--capacity", "10000",
                          "--soc", "50")),
              ("shed", ("--gain", "0.6", "--max-charge", "1500", "--max-discharge", "1500", "--capacity", "5000",
                        "--soc", "60")))
DISPATCH_TARGETS_W = (2000.0, -3500.0, 1000.0, -1500.0)
DISPATCH_STEP_S = 20.0
REPORT_PERIOD_S = 5.0


def _dispatched_battery(name: str) -> dict[str, Any]:
    service = f"com.batteryaggregator.controllable.{name}"
    return {"name": name, "setpoint": {"dbus": {"service": service, "path": "/Setpoint"}},
            "measured": {"dbus": {"service": service, "path": "/Dc/0/Power"}},
            "soc": {"dbus": {"service": service, "path": "/Soc"}},
            "capacity": {"dbus": {"service": service, "path": "/CapacityWh"}},
            "maxChargeW": 3000, "maxDischargeW": 3000}


ALL_CONFIG = {"dispatcher": {"enabled": True, "cycleSeconds": 1.0,
                             "batteries": [_dispatched_battery(name) for name, _ in DISPATCHED]}}


@dataclass
class ReportingBattery:
    """A battery that is not on D-Bus (a Sessy read by a Homey flow) and reports running totals."""

    id: str
    charged_kwh: float
    discharged_kwh: float
    soc: float
    power_w: float  # + charging
    capacity_kwh: float = 5.0
    voltage: float = 50.0

    def advance(self, seconds: float) -> dict[str, Variant]:
        """Move on `seconds` and return the report (the D-Bus Report's a{sv})."""
        kwh = self.power_w * seconds / 3.6e6
        if not 5.0 < self.soc + 100 * kwh / self.capacity_kwh < 95.0:
            self.power_w = -self.power_w  # turn round before empty or full
            kwh = -kwh
        if kwh > 0:
            self.charged_kwh += kwh
        else:
            self.discharged_kwh -= kwh
        self.soc += 100 * kwh / self.capacity_kwh
        return {"id": Variant("s", self.id), "charged": Variant("d", round(self.charged_kwh, 4)),
                "discharged": Variant("d", round(self.discharged_kwh, 4)), "soc": Variant("d", round(self.soc, 2)),
                "capacity": Variant("d", round(1000 * self.capacity_kwh / self.voltage, 1))}


def reporting_batteries() -> list[ReportingBattery]:
    return [ReportingBattery("sessy-1", 2011.12, 1890.4, 40.0, 1200.0),
            ReportingBattery("sessy-2", 845.3, 790.0, 70.0, -800.0)]


# --all: the cooperative. Each household is a GX of its own: it sees its own battery and system only.
@dataclass(frozen=True)
class CoopHousehold:
    site_id: str
    capacity_wh: float
    soc: float
    pv_w: float
    load_w: float


COOP_HOUSEHOLDS = (CoopHousehold("rivendell", 10000, 85, 2500, 600),  # sunny and full: delivers
                   CoopHousehold("shire", 10000, 30, 300, 900),  # behind: imports for the fleet
                   CoopHousehold("bree", 5000, 55, 0, 400))  # near the average
COOP_MAX_POWER_W = 3000.0
COOP_READER = "coop-homeassistant"  # the ACL's read-only user (setup/coop/acl.example)


class _Children:
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
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


def coop_site_config(house: CoopHousehold, broker: MosquittoBroker, password: str, state_dir: Path,
                     publish_seconds: float, registry: dict[str, dict[str, float]]) -> dict[str, Any]:
    """One household's aggregator: its one battery, the dispatcher commanding it, the cooperative steering it."""
    name = house.site_id
    battery = f"com.victronenergy.battery.{name}"
    assert broker.tls_files is not None
    return {
        "serviceName": AGGREGATE, "stateDir": str(state_dir), "startupBatteryWait": 10,
        "dispatcher": {"enabled": True, "cycleSeconds": 1.0, "batteries": [{
            "name": name,
            "setpoint": {"dbus": {"service": f"com.victronenergy.acsystem.{name}",
                                  "path": "/Ess/InverterPowerSetpoint"}},
            "measured": {"dbus": {"service": battery, "path": "/Dc/0/Power"}},
            "soc": {"dbus": {"service": battery, "path": "/Soc"}},
            "capacityWh": house.capacity_wh, "maxChargeW": COOP_MAX_POWER_W, "maxDischargeW": COOP_MAX_POWER_W}]},
        "coop": {"enabled": True, "siteId": name, "publishSeconds": publish_seconds,
                 "peerTimeoutSeconds": max(30.0, 6 * publish_seconds), "maxChargeW": COOP_MAX_POWER_W,
                 "maxDischargeW": COOP_MAX_POWER_W, "peers": registry,
                 "broker": {"host": broker.host, "port": broker.port, "caFile": str(broker.tls_files.ca),
                            "password": password}},
    }


class Cooperative:
    """Households on private buses of their own, one mosquitto (TLS, a password per site, the example ACL)."""

    def __init__(self, workdir: Path, households: tuple[CoopHousehold, ...] = COOP_HOUSEHOLDS,
                 publish_seconds: float = 5.0) -> None:
        self.workdir = workdir
        self.households = households
        self.publish_seconds = publish_seconds
        self.passwords = {h.site_id: secrets.token_hex(8) for h in households} | {COOP_READER: secrets.token_hex(8)}
        self.broker = MosquittoBroker(users=self.passwords, acl=(REPO / "setup" / "coop" / "acl.example").read_text(),
                                      tls=True, directory=workdir / "broker")
        self.buses: dict[str, PrivateBus] = {}
        self.children: dict[str, _Children] = {}

    def start(self) -> None:
        self.broker.start()
        registry = {h.site_id: {"capacityKwh": h.capacity_wh / 1000} for h in self.households}
        for i, house in enumerate(self.households):
            name = house.site_id
            bus = self.buses[name] = PrivateBus()
            bus.start()
            env = bus.env(_child_env())
            site_dir = self.workdir / name
            children = self.children[name] = _Children(site_dir, env)
            children.start("household", "aggregator_dev.simulator.household", "--name", name, "--capacity",
                           str(house.capacity_wh), "--soc", str(house.soc), "--pv", str(house.pv_w), "--load",
                           str(house.load_w), "--max-power", str(COOP_MAX_POWER_W), "--period", str(90 + 30 * i))
            config = coop_site_config(house, self.broker, self.passwords[name], site_dir / "state",
                                      self.publish_seconds, registry)
            (site_dir / "config.json").write_text(json.dumps(config, indent=2))
            children.start("aggregator", "aggregator", "run", "--config", str(site_dir / "config.json"))

    def info(self) -> dict[str, Any]:
        assert self.broker.tls_files is not None
        return {"broker": {"host": self.broker.host, "port": self.broker.port, "caFile": str(self.broker.tls_files.ca),
                           "username": COOP_READER, "password": self.passwords[COOP_READER]},
                "sites": {name: bus.address for name, bus in self.buses.items()}}

    def dead(self) -> list[str]:
        return [f"{name}/{label}" for name, children in self.children.items() for label in children.dead()]

    def stop(self) -> None:
        for children in self.children.values():
            children.stop()
        for bus in self.buses.values():
            bus.stop()
        self.broker.stop()


def _child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class _Features:
    """What --all drives from the demo itself: the energy reports and the dispatcher's target."""

    def __init__(self, bus: Any, coop: Cooperative, report_every: float = REPORT_PERIOD_S) -> None:
        self.bus = bus
        self.coop = coop
        self.report_every = report_every
        self.reporting = reporting_batteries()
        self.report_status = "no report sent yet"
        self.coop_monitors: dict[str, ServiceMonitor] = {}
        self.coop_buses: list[Any] = []

    async def start(self) -> list[asyncio.Task[None]]:
        for name, address in self.coop.info()["sites"].items():
            bus = await connect(address)
            self.coop_buses.append(bus)
            monitor = self.coop_monitors[name] = ServiceMonitor(bus, [AGGREGATE])
            await monitor.start()
        loop = asyncio.get_running_loop()
        return [loop.create_task(self._report()), loop.create_task(self._steer())]

    async def stop(self) -> None:
        for monitor in self.coop_monitors.values():
            await monitor.stop()
        for bus in self.coop_buses:
            bus.disconnect()

    async def _report(self) -> None:
        """Every few seconds each reporting battery sends its totals, as a Homey flow would."""
        while True:
            answers = []
            for battery in self.reporting:
                try:
                    reply = await client.call(self.bus, AGGREGATE, "/", "Report", "a{sv}",
                                              [battery.advance(REPORT_PERIOD_S)], interface=ENERGY_INTERFACE)
                    answers.append(str(reply.body[0]))
                except client.CallError as exc:
                    answers.append(f"{battery.id}: {str(exc).split(': ', 1)[-1]}")
            self.report_status = "; ".join(answers)
            await asyncio.sleep(self.report_every)

    async def _steer(self) -> None:
        """The dispatcher's target steps through a schedule, as a user or an automation would set it."""
        targets = itertools.cycle(DISPATCH_TARGETS_W)
        target = next(targets)
        while True:
            try:
                code: int | None = await client.set_value(self.bus, AGGREGATE, "/Dispatcher/TargetPower", target)
            except client.CallError:
                code = None  # the aggregator is not up yet
            if code != 0:
                await asyncio.sleep(1.0)
                continue
            await asyncio.sleep(DISPATCH_STEP_S)
            target = next(targets)

    def lines(self, aggregate: dict[str, Any] | None) -> list[str]:
        values = aggregate or {}
        sites = {name: (m.services[AGGREGATE].values if AGGREGATE in m.services else {})
                 for name, m in self.coop_monitors.items()}
        return (external_lines(values, self.report_status) + dispatcher_lines(values)
                + coop_lines(sites, self.coop.broker.port))


async def _live(address: str, children: _Children, duration: float | None, refresh: float, workdir: Path,
                coop: Cooperative | None = None, report_every: float = REPORT_PERIOD_S) -> int:
    bus = await connect(address)
    batteries = ServiceMonitor(bus, [BATTERY_PREFIX])
    control = ServiceMonitor(bus, [CONTROL_SERVICE], require_device_instance=False)
    await batteries.start()
    await control.start()
    features = _Features(bus, coop, report_every) if coop is not None else None
    tasks = await features.start() if features is not None else []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tty = sys.stdout.isatty()
    started = time.monotonic()
    footer = "\n".join(["", f"Logs in {workdir}.", *status_hint(address)])
    while not stop.is_set():
        bank = control.services.get(CONTROL_SERVICE)
        dead = children.dead() + (coop.dead() if coop is not None else [])
        title = (f"battery-aggregator demo — private bus, {len(batteries.services)} battery services"
                 f"{' — STOPPED: ' + ', '.join(dead) if dead else ''} — Ctrl-C to quit")
        screen = render(batteries.services.values(), bank.values if bank else None, title)
        if features is not None:
            aggregate = batteries.services.get(AGGREGATE)
            screen += "\n" + "\n".join(features.lines(aggregate.values if aggregate else None))
        sys.stdout.write(("\x1b[H\x1b[2J" if tty else "\n") + screen + "\n" + footer + "\n")
        sys.stdout.flush()
        if duration is not None and time.monotonic() - started >= duration:
            break
        try:
            await asyncio.wait_for(stop.wait(), refresh)
        except asyncio.TimeoutError:
            pass
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if features is not None:
        await features.stop()
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


def main(scenario: str = "default", duration: float | None = None, refresh: float = 1.0,
         everything: bool = False, report_every: float = REPORT_PERIOD_S) -> int:
    try:
        private_bus = PrivateBus()
        address = private_bus.start()
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="battagg-demo-"))
    config = dict(DEMO_CONFIG, stateDir=str(workdir / "state"))  # never the GX's /data in a demo
    if everything:
        config.update(ALL_CONFIG)
        if report_every < REPORT_PERIOD_S:  # a time-lapse: the reports' power bound is set out of the way
            config["energy"] = {"members": {b.id: {"maxPowerKw": 100000} for b in reporting_batteries()}}
    (workdir / "config.json").write_text(json.dumps(config, indent=2))
    children = _Children(workdir, private_bus.env(_child_env()))
    coop = Cooperative(workdir / "coop") if everything else None
    try:
        children.start("localsettings", "aggregator_dev.simulator.localsettings", "--store",
                       str(workdir / "settings.json"))
        children.start("simulator", "aggregator", "simulate", scenario)
        morning = datetime.now().replace(hour=8, minute=0, second=0, microsecond=0).isoformat()
        children.start("grid-meter", "aggregator_dev.simulator.grid_meter", "--name", "demo", "--time-scale",
                       str(GRID_TIME_SCALE), "--start", morning, "--solar-peak", str(GRID_SOLAR_PEAK_W))
        if everything:
            for i, (name, args) in enumerate(DISPATCHED):
                children.start(f"controllable-{name}", "aggregator_dev.simulator.controllable", "--name", name,
                               "--layout", "generic", "--device-instance", str(60 + i), *args)
        children.start("aggregator", "aggregator", "run", "--config", str(workdir / "config.json"))
        info: dict[str, Any] = {"bus": address, "aggregate": AGGREGATE}
        if coop is not None:
            coop.start()
            info["coop"] = coop.info()
        (workdir / "demo.json").write_text(json.dumps(info, indent=2))
        return asyncio.run(_live(address, children, duration, refresh, workdir, coop, report_every))
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:  # mosquitto missing or not starting
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if coop is not None:
            coop.stop()
        children.stop()
        private_bus.stop()
        print(f"demo stopped; logs kept in {workdir}")
