"""What the service process maps into its memory, read from outside (/proc/PID/maps) while it serves the bus: a
config without side features loads neither the config model's library (pydantic: checked in a child) nor TLS
(OpenSSL) nor numpy; a feature that is on brings what it needs; a reload that turns on an MQTT link restarts."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aggregator.bus import client
from aggregator.bus.lib import connect

from ..conftest import Processes
from ..helpers import eventually

# Shared libraries of what a plain service leaves out (pydantic_core's, OpenSSL's through _ssl/_hashlib, numpy's).
LEFT_OUT = ("pydantic_core", "/_ssl.", "/_hashlib.", "/libssl", "/libcrypto", "/numpy")


def mapped(pid: int) -> set[str]:
    """The files a process has mapped: its shared libraries and extension modules."""
    files = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            files.add(parts[5])
    return files


def loaded(pid: int) -> list[str]:
    return sorted(name for name in LEFT_OUT if any(name in file for file in mapped(pid)))


def write_config(path: Path, tmp_path: Path, **keys: Any) -> Path:
    path.write_text(json.dumps({"stateDir": str(tmp_path / "state"), "startupBatteryWait": 0, **keys}))
    return path


async def started(processes: Processes, bus_address: str, config: Path, name: str) -> Any:
    proc = processes.start("run", "--config", str(config))
    observer = await connect(bus_address)
    try:
        await eventually(lambda: client.name_owner(observer, name, 1.0), timeout=30)
    finally:
        observer.disconnect()
    return proc


async def test_a_plain_service_maps_no_pydantic_no_tls_and_no_numpy(processes: Processes, bus_address: str,
                                                                  tmp_path: Path) -> None:
    name = "com.victronenergy.battery.leanplain"
    proc = await started(processes, bus_address, write_config(tmp_path / "config.json", tmp_path, serviceName=name),
                         name)
    assert loaded(proc.pid) == []
    assert proc.poll() is None
    # The child check wrote what the file set as the last good config, as before.
    assert json.loads((tmp_path / "config.json.last-good").read_text())["serviceName"] == name


async def test_a_service_with_the_dispatcher_loads_what_it_needs(processes: Processes, bus_address: str,
                                                                 tmp_path: Path) -> None:
    """The other side of the rule, and proof that the probe sees a library when it is there."""
    name = "com.victronenergy.battery.leandispatch"
    service = "com.batteryaggregator.controllable.lean"
    battery = {"name": "lean", "setpoint": {"dbus": {"service": service, "path": "/Setpoint"}},
               "measured": {"dbus": {"service": service, "path": "/Dc/0/Power"}}, "maxChargeW": 1000,
               "maxDischargeW": 1000, "capacityWh": 5000}
    config = write_config(tmp_path / "config.json", tmp_path, serviceName=name,
                          dispatcher={"enabled": True, "batteries": [battery]})
    proc = await started(processes, bus_address, config, name)
    await eventually(lambda: {"pydantic_core", "/_ssl.", "/numpy"} <= set(loaded(proc.pid)), timeout=30)


async def test_a_reload_that_turns_on_an_mqtt_link_restarts_the_process(processes: Processes, bus_address: str,
                                                                       tmp_path: Path) -> None:
    name = "com.victronenergy.battery.leanreload"
    config = write_config(tmp_path / "config.json", tmp_path, serviceName=name)
    proc = await started(processes, bus_address, config, name)
    broker = {"host": "127.0.0.1", "port": 1, "tls": False}
    write_config(config, tmp_path, serviceName=name,
                 coop={"enabled": True, "siteId": "lean", "broker": broker})
    proc.send_signal(1)  # SIGHUP: reload now
    code = await asyncio.get_running_loop().run_in_executor(None, lambda: proc.wait(timeout=60))
    output = processes.output(proc)
    assert code == 2, output
    assert "TLS support this process left out" in output
    # The new config was good: it is the last good one, which the restarted process runs with TLS.
    assert json.loads((tmp_path / "config.json.last-good").read_text())["coop"]["enabled"] is True
