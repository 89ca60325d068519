"""Smoke run on dbus-fast (Victron's choice for asyncio services): the same code, the other library.

The simulator and the watcher run with BATTERY_AGGREGATOR_DBUS=dbus-fast; busctl and our monitor on
dbus-next read them, so both libraries interoperate through the bus.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from aggregator.bus.lib import connect
from aggregator.bus.monitor import ServiceMonitor
from aggregator_dev.simulator.bus_bank import CONTROL_SERVICE

from ..conftest import Busctl, Processes
from ..helpers import eventually

FAST = {"BATTERY_AGGREGATOR_DBUS": "dbus-fast"}


async def test_simulator_and_watcher_run_on_dbus_fast(processes: Processes, busctl: Busctl, tmp_path: Path) -> None:
    sim = processes.start("simulate", "default", "--rate", "4", "--log-level", "DEBUG", env=FAST)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"serviceName": "com.victronenergy.battery.fastagg",
                                  "stateDir": str(tmp_path / "state")}))
    daemon = processes.start("run", "--config", str(config), env=FAST)
    monitor = ServiceMonitor(await connect(), ["com.victronenergy.battery.sim_"])
    await monitor.start()
    await eventually(lambda: len(monitor.services) == 3, timeout=20)
    name = "com.victronenergy.battery.sim_a"
    reply = await busctl.acall_json(name, "/Dc", "GetValue")
    assert reply["type"] == "v" and reply["data"][0]["type"] == "a{sv}"
    assert "0/Voltage" in reply["data"][0]["data"]
    assert (await busctl.acall_json(name, "/CustomName", "SetValue", "v", "s", "Renamed"))["data"] == [0]
    await eventually(lambda: monitor.services[name].values["/CustomName"] == "Renamed")
    # Signals from the dbus-fast publisher reach the dbus-next monitor: force a current and see it.
    assert (await busctl.acall_json(CONTROL_SERVICE, "/BankCurrent", "SetValue", "v", "d", "--", "-75"))["data"] == [0]
    await eventually(lambda: abs(sum(s.values["/Dc/0/Current"] for s in monitor.services.values()) + 75) < 0.5)
    await eventually(lambda: "member com.victronenergy.battery.sim_c (" in processes.output(daemon),
                     timeout=20, interval=0.2)
    # The aggregate published by the daemon on dbus-fast reads right with busctl.
    async def aggregated() -> bool:
        reply = await busctl.acall_json("com.victronenergy.battery.fastagg", "/System/NrOfBatteries", "GetValue")
        return reply["data"][0] == {"type": "i", "data": 3}

    await eventually(aggregated, timeout=20, interval=0.2)
    # The side features' patient calls (a flag dbus-next's messages carry) work on dbus-fast's messages too.
    patient = subprocess.run(
        [sys.executable, "-c", "import asyncio; from aggregator.bus import client; from aggregator.bus.lib import "
         "connect\nasync def main():\n    bus = await connect()\n    print(await client.get_value(bus, "
         f"{name!r}, '/DeviceInstance', patient=True))\nasyncio.run(main())"],
        env={**os.environ, **FAST}, capture_output=True, text=True, timeout=30)
    assert patient.stdout.strip() == str(monitor.services[name].device_instance), patient.stderr[-2000:]
    assert "on dbus-fast" in processes.output(sim)
    assert "(dbus-fast)" in processes.output(daemon)
    assert sim.poll() is None and daemon.poll() is None
    await monitor.stop()
