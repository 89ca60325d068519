"""The simulator as a separate process, read over the bus the way the GX and our monitor read batteries."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aggregator.bus import client
from aggregator.bus.lib import connect
from aggregator.bus.monitor import ServiceMonitor
from aggregator_dev.simulator.bus_bank import CONTROL_SERVICE

from ..conftest import REPO, Busctl, Processes
from ..helpers import eventually

PACKS = ("com.victronenergy.battery.sim_a", "com.victronenergy.battery.sim_b", "com.victronenergy.battery.sim_c")
DOCUMENTED_PATHS = (
    "/Mgmt/ProcessName", "/Mgmt/ProcessVersion", "/Mgmt/Connection", "/DeviceInstance", "/ProductId",
    "/ProductName", "/FirmwareVersion", "/HardwareVersion", "/Connected", "/CustomName", "/Serial",
    "/Dc/0/Voltage", "/Dc/0/Current", "/Dc/0/Power", "/Dc/0/Temperature", "/Soc", "/Soh", "/Capacity",
    "/InstalledCapacity", "/ConsumedAmphours", "/TimeToGo", "/Info/MaxChargeCurrent",
    "/Info/MaxDischargeCurrent", "/Info/MaxChargeVoltage", "/Info/BatteryLowVoltage", "/Info/ChargeMode",
    "/Io/AllowToCharge", "/Io/AllowToDischarge", "/Io/AllowToBalance", "/Balancing",
    "/System/MinCellVoltage", "/System/MaxCellVoltage", "/System/MinVoltageCellId", "/System/MaxVoltageCellId",
    "/System/NrOfModulesOnline", "/System/NrOfModulesOffline", "/System/NrOfCellsPerBattery",
    "/Alarms/LowVoltage", "/Alarms/HighVoltage", "/Alarms/CellImbalance", "/History/ChargedEnergy",
    "/History/DischargedEnergy", "/History/TotalAhDrawn",
)


@pytest.fixture
def simulator(processes: Processes) -> subprocess.Popen[str]:
    proc = processes.start("simulate", "default", "--rate", "5")
    yield proc
    assert proc.poll() is None, "the simulator died during the test:\n" + processes.output(proc)


async def _wait_for_packs(busctl: Busctl) -> None:
    async def all_there() -> bool:
        names = (await busctl.arun("list", "--no-pager", "--acquired", check=False)).stdout
        return all(p in names for p in PACKS) and CONTROL_SERVICE in names

    await eventually(all_there, timeout=20, interval=0.2)


async def test_busctl_reads_a_simulated_pack_as_a_victron_battery(simulator: Any, busctl: Busctl) -> None:
    await _wait_for_packs(busctl)
    reply = await busctl.acall_json(PACKS[0], "/", "GetItems")
    assert reply["type"] == "a{sa{sv}}"
    items = reply["data"][0]
    missing = [p for p in DOCUMENTED_PATHS if p not in items]
    assert not missing, missing
    assert items["/DeviceInstance"]["Value"]["type"] == "i"
    assert items["/Connected"]["Value"] == {"type": "i", "data": 1}
    assert items["/ProductId"]["Text"] == {"type": "s", "data": "0xB0F0"}
    assert items["/Dc/0/Voltage"]["Value"]["type"] == "d"
    assert items["/Dc/0/Voltage"]["Text"]["data"].endswith("V")
    assert items["/Soc"]["Text"]["data"].endswith("%")
    assert items["/Info/MaxChargeCurrent"]["Text"]["data"].endswith("A")
    assert items["/History/ChargedEnergy"]["Text"]["data"].endswith("kWh")
    # The three packs got distinct device instances (reserved like a real driver would).
    instances = set()
    for name in PACKS:
        instances.add((await busctl.acall_json(name, "/DeviceInstance", "GetValue"))["data"][0]["data"])
    assert len(instances) == 3


async def test_one_itemschanged_per_tick_and_no_propertieschanged(simulator: Any, busctl: Busctl,
                                                                  bus_address: str) -> None:
    await _wait_for_packs(busctl)
    owner = (await busctl.acall_json("org.freedesktop.DBus", "/org/freedesktop/DBus", "GetNameOwner", "s", PACKS[0],
                                     interface="org.freedesktop.DBus"))["data"][0]
    monitor = await asyncio.create_subprocess_exec(
        "dbus-monitor", "--address", bus_address, f"type='signal',sender='{owner}'",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert monitor.stdout is not None
    await asyncio.wait_for(monitor.stdout.readline(), 5)  # its own NameAcquired: it listens
    bus = await connect()
    for current in (10.0, 50.0, -30.0, 20.0):  # each change moves current, power, voltage... of every pack
        await client.set_value(bus, CONTROL_SERVICE, "/BankCurrent", current)
        await asyncio.sleep(0.5)  # a few of the simulator's ticks at each current
    bus.disconnect()
    monitor.terminate()
    out = (await monitor.communicate())[0].decode()
    items_changed = out.count("member=ItemsChanged")
    # 2.5 s at 5 Hz is at most ~13 ticks; a tick with changes sends exactly one signal, a quiet one none.
    assert 4 <= items_changed <= 14, items_changed
    assert "member=PropertiesChanged" not in out
    # One signal carries all of a tick's changes together.
    assert any("/Dc/0/Current" in block and "/Dc/0/Power" in block for block in out.split("signal time="))


async def test_bank_current_splits_by_resistance_and_charge_is_conserved(simulator: Any, busctl: Busctl) -> None:
    await _wait_for_packs(busctl)
    bus = await connect()
    assert await client.set_value(bus, CONTROL_SERVICE, "/BankCurrent", 90.0) == 0
    monitor = ServiceMonitor(bus, ["com.victronenergy.battery.sim_"])
    await monitor.start()

    def split() -> dict[str, float] | None:
        currents = {n: monitor.services[n].values.get("/Dc/0/Current") for n in PACKS if n in monitor.services}
        if len(currents) == 3 and all(isinstance(c, float) for c in currents.values()) \
                and abs(sum(currents.values()) - 90.0) < 0.5:
            return currents
        return None

    currents = await eventually(split, timeout=10)
    # The 280 Ah pack (6 mOhm) takes the most, the 100 Ah pack (12 mOhm) the least.
    assert currents[PACKS[0]] > currents[PACKS[1]] > currents[PACKS[2]] > 0
    # All packs sit on one bus: the same terminal voltage.
    voltages = [monitor.services[n].values["/Dc/0/Voltage"] for n in PACKS]
    assert max(voltages) - min(voltages) < 0.02
    assert await client.set_value(bus, CONTROL_SERVICE, "/BankCurrent", "lots") == 1  # wrong type
    await monitor.stop()
    bus.disconnect()


async def test_faults_injected_at_run_time(simulator: Any, busctl: Busctl, processes: Processes) -> None:
    await _wait_for_packs(busctl)
    bus = await connect()
    await client.set_value(bus, CONTROL_SERVICE, "/BankCurrent", 40.0)
    monitor = ServiceMonitor(bus, ["com.victronenergy.battery.sim_"])
    await monitor.start()
    sim_c = PACKS[2]

    # absurd values, through the CLI command
    fault = processes.start("fault", "sim_c", "absurd", "--duration", "2")
    assert await asyncio.get_running_loop().run_in_executor(None, fault.wait) == 0
    await eventually(lambda: monitor.services[sim_c].values.get("/Soc") == 150.0)
    assert monitor.services[sim_c].values["/Dc/0/Current"] == "n/a"
    assert monitor.services[sim_c].values["/Capacity"] == -100.0
    await eventually(lambda: (monitor.services[sim_c].values.get("/Soc") or 0) <= 100, timeout=6)

    # the BMS opens its FETs: it carries nothing, forbids charging, and the others take the whole current
    await client.set_value(bus, CONTROL_SERVICE, "/Packs/sim_c/FaultDuration", 0.0)
    assert await client.set_value(bus, CONTROL_SERVICE, "/Packs/sim_c/Fault", "fets_open") == 0
    await eventually(lambda: monitor.services[sim_c].values.get("/Io/AllowToCharge") == 0
                     and monitor.services[sim_c].values.get("/Dc/0/Current") == 0.0)
    await eventually(lambda: abs(sum(monitor.services[n].values["/Dc/0/Current"] for n in PACKS[:2]) - 40.0) < 0.5)
    assert await client.set_value(bus, CONTROL_SERVICE, "/Packs/sim_c/Fault", "") == 0

    # vanish and return
    await client.set_value(bus, CONTROL_SERVICE, "/Packs/sim_c/FaultDuration", 1.0)
    await client.set_value(bus, CONTROL_SERVICE, "/Packs/sim_c/Fault", "vanish")
    await eventually(lambda: sim_c not in monitor.services)
    await eventually(lambda: sim_c in monitor.services, timeout=10)

    # freeze: no more updates for its duration, while the others go on
    await client.set_value(bus, CONTROL_SERVICE, "/Packs/sim_c/FaultDuration", 0.0)
    await client.set_value(bus, CONTROL_SERVICE, "/Packs/sim_c/Fault", "freeze")
    await asyncio.sleep(0.5)
    frozen_at = dict(monitor.services[sim_c].values)
    await client.set_value(bus, CONTROL_SERVICE, "/BankCurrent", -60.0)  # the bank turns to discharging
    await eventually(lambda: monitor.services[PACKS[0]].values["/Dc/0/Current"] < 0)
    await asyncio.sleep(0.5)
    assert monitor.services[sim_c].values == frozen_at  # still the charging values of before
    assert await client.set_value(bus, CONTROL_SERVICE, "/Packs/sim_c/Fault", "melt") == 2  # unknown fault
    await monitor.stop()
    bus.disconnect()


def test_a_bad_scenario_is_refused_with_the_key_and_value(tmp_path: Path, bus_address: str) -> None:
    bad = tmp_path / "bad.json"
    scenario = json.loads((REPO / "aggregator_dev/simulator/scenarios/default.json").read_text())
    scenario["packs"][1]["soc"] = 150
    bad.write_text(json.dumps(scenario))
    result = subprocess.run([sys.executable, "-m", "aggregator", "simulate", str(bad)], capture_output=True,
                            text=True, cwd=REPO, timeout=30)
    assert result.returncode == 1
    assert "packs[1].soc" in result.stderr and "150" in result.stderr
