"""Energy totals on the real bus: `battery-aggregator run` as its own process, members built by the tests,
external batteries reported by the CLI, busctl, dbus-send and HTTP, totals read back with busctl."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from aggregator.bus import client

from .conftest import REPO, Busctl, Processes
from .helpers import eventually
from .test_aggregate import Bank, bus_address, start_aggregator, start_settings  # noqa: F401  (fixture)

COUNTERS = {"History__ChargedEnergy": 10.0, "History__DischargedEnergy": 5.0}


def _value(busctl: Busctl, service: str, path: str) -> Any:
    return busctl.call_json(service, path, "GetValue")["data"][0]["data"]


async def _totals_are(busctl: Busctl, service: str, charged: float, discharged: float) -> None:
    """Poll the aggregate's totals with busctl (an independent client) until they are these kWh."""
    async def check() -> tuple[Any, Any]:
        got = await asyncio.get_running_loop().run_in_executor(
            None, lambda: (_value(busctl, service, "/History/ChargedEnergy"),
                           _value(busctl, service, "/History/DischargedEnergy")))
        assert isinstance(got[0], float) and abs(got[0] - charged) < 1e-6 and abs(got[1] - discharged) < 1e-6, got
        return got

    await eventually(check, timeout=10, interval=0.2)


def _cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=address)
    return subprocess.run([sys.executable, "-m", "aggregator", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=30)


async def acli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.get_running_loop().run_in_executor(None, lambda: _cli(address, *args))


async def test_a_member_counter_reset_continues_the_totals(processes: Processes, tmp_path: Path,
                                                           busctl: Busctl) -> None:
    bank = Bank()
    pack = await bank.add("a", **COUNTERS)
    agg, _ = start_aggregator(processes, tmp_path, bank, stateDir=str(tmp_path / "state"))
    await bank.value_is(agg, "/Batteries/0/Identity", f"SN-{bank.tag}-a")
    pack.set_values({"/History/ChargedEnergy": 10.1, "/History/DischargedEnergy": 5.1})
    await _totals_are(busctl, agg, 0.1, 0.1)
    pack.set_values({"/History/ChargedEnergy": 0.05, "/History/DischargedEnergy": 0.0})  # the BMS restarted
    await _totals_are(busctl, agg, 0.15, 0.1)
    pack.set_value("/History/ChargedEnergy", 0.15)
    await _totals_are(busctl, agg, 0.25, 0.1)
    await bank.value_is(agg, "/Batteries/0/History/ChargedEnergy", 0.25)
    bank.close()


async def test_one_battery_under_two_services_is_counted_once_and_named(processes: Processes, tmp_path: Path,
                                                                        busctl: Busctl) -> None:
    bank = Bank()
    can = await bank.add("can", Serial="SN-SHARED", **COUNTERS)
    await asyncio.sleep(0.3)  # seen first: its values are the ones used
    serial = await bank.add("ser", Serial="SN-SHARED", **COUNTERS)
    agg, proc = start_aggregator(processes, tmp_path, bank, stateDir=str(tmp_path / "state"))

    async def warned() -> bool:
        try:
            text = await bank.read(agg, "/Energy/Duplicates")
        except client.CallError:  # not registered yet
            return False
        return isinstance(text, str) and bank.name("can") in text and bank.name("ser") in text

    await eventually(warned, timeout=10)
    status = await bank.read(agg, "/Energy/Status")
    assert status.startswith("duplicate batteries: SN-SHARED")
    for pack in (can, serial):
        pack.set_value("/History/ChargedEnergy", 10.1)
    await _totals_are(busctl, agg, 0.1, 0.0)
    assert await bank.read(agg, "/Energy/Batteries") == 1  # one level, not two
    log = processes.output(proc)
    assert any(bank.name("can") in line and bank.name("ser") in line and "counted once" in line
               for line in log.splitlines()), log
    bank.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _post(port: int, body: Any) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/report", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def test_an_external_battery_reported_by_cli_dbus_and_http(processes: Processes, tmp_path: Path,
                                                                 busctl: Busctl, bus_address: str) -> None:
    bank = Bank()
    await bank.add("a", Soc=50.0, InstalledCapacity=100.0)  # no counters, no current: 0 kWh
    port = _free_port()
    agg, _ = start_aggregator(processes, tmp_path, bank, stateDir=str(tmp_path / "state"),
                              energy={"httpPort": port, "members": {"shed": {"counterKind": "total"}}})
    await bank.value_is(agg, "/Batteries/0/State", "online")
    first = await acli(bus_address, "report", "shed", "--charged", "5", "--discharged", "2", "--soc", "40",
                       "--capacity", "300", "--service", agg)
    assert first.returncode == 0, first.stderr
    await bank.value_is(agg, "/Energy/External/0/Id", "shed")
    await bank.value_is(agg, "/Energy/AverageSoc", 45.0)
    await bank.value_is(agg, "/Energy/CapacityWeightedSoc", 42.5)  # (50 x 100 + 40 x 300) / 400
    assert await bank.read(agg, "/Soc") == 50.0  # not on this DC bus: the DC aggregate is the member's alone
    # busctl with a{sv}, then dbus-send with explicit arguments (dbus-send cannot build a{sv}).
    await busctl.arun("call", agg, "/", "org.batteryaggregator.Energy", "Report", "a{sv}", "4", "id", "s", "shed",
                      "charged", "d", "5.1", "discharged", "d", "2", "soc", "d", "41")
    await _totals_are(busctl, agg, 0.1, 0.0)
    sent = await asyncio.get_running_loop().run_in_executor(None, lambda: subprocess.run(
        ["dbus-send", f"--bus={bus_address}", "--print-reply", f"--dest={agg}", "/",
         "org.batteryaggregator.Energy.ReportValues", "string:shed", "double:5.2", "double:2.1", "double:42",
         "double:-1"], capture_output=True, text=True, timeout=10))
    assert sent.returncode == 0 and "0.200 kWh charged" in sent.stdout, sent
    await _totals_are(busctl, agg, 0.2, 0.1)
    await bank.value_is(agg, "/Energy/External/0/Soc", 42.0)
    # The energy since the last report instead of the running total: refused, nothing counted.
    delta = await acli(bus_address, "report", "shed", "--charged", "0.1", "--discharged", "0.1", "--soc", "42",
                       "--service", agg)
    assert delta.returncode == 1
    assert "below the last reported total 5.2 kWh" in delta.stderr and "not the energy since" in delta.stderr
    refused = await busctl.arun("call", agg, "/", "org.batteryaggregator.Energy", "Report", "a{sv}", "4", "id",
                                "s", "shed", "charged", "d", "0.1", "discharged", "d", "2.1", "soc", "d", "42",
                                check=False)
    assert refused.returncode != 0 and "below the last reported total" in refused.stderr
    # Bad fields: the CLI (before the bus), the D-Bus method and HTTP all name field, value and what is allowed.
    bad = await acli(bus_address, "report", "shed", "--charged", "5.3", "--discharged", "2.1", "--soc", "150",
                     "--service", agg)
    assert bad.returncode == 1 and "soc: 150 is out of range; allowed: a number from 0 to 100" in bad.stderr
    refused = await busctl.arun("call", agg, "/", "org.batteryaggregator.Energy", "Report", "a{sv}", "4", "id",
                                "s", "shed", "charged", "s", "lots", "discharged", "d", "2.1", "soc", "d", "42",
                                check=False)
    assert refused.returncode != 0 and "charged: 'lots' is not a number" in refused.stderr, refused.stderr
    loop = asyncio.get_running_loop()
    code, body = await loop.run_in_executor(None, lambda: _post(port, {"id": "shed", "charged": 5.3,
                                                                       "discharged": 2.1, "soc": "lots"}))
    assert code == 400 and "soc:" in body["error"] and "not a number" in body["error"], body
    code, body = await loop.run_in_executor(None, lambda: _post(port, {"id": "shed", "charged": 5.3,
                                                                       "discharged": 2.1, "soc": 43}))
    assert code == 200 and body["ok"], body
    await _totals_are(busctl, agg, 0.3, 0.1)
    assert await bank.read(agg, "/Energy/Status") == "ok"
    bank.close()


async def test_kill_9_and_restart_keeps_the_totals(processes: Processes, tmp_path: Path, busctl: Busctl) -> None:
    bank = Bank()
    pack = await bank.add("a", **COUNTERS)
    state = tmp_path / "state"
    agg, proc = start_aggregator(processes, tmp_path, bank, stateDir=str(state))
    await bank.value_is(agg, "/Batteries/0/Identity", f"SN-{bank.tag}-a")
    pack.set_values({"/History/ChargedEnergy": 10.1, "/History/DischargedEnergy": 5.2})
    await _totals_are(busctl, agg, 0.1, 0.2)
    await eventually(lambda: (state / "energy.json").exists(), timeout=5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=5)
    pack.set_value("/History/ChargedEnergy", 10.2)  # charged on while the service was away
    agg, proc = start_aggregator(processes, tmp_path, bank, stateDir=str(state))
    await _totals_are(busctl, agg, 0.2, 0.2)
    proc.terminate()  # a clean stop saves at once
    assert proc.wait(timeout=10) == 0
    exported = await acli(processes.address, "energy", "--csv", "--state-dir", str(state))
    assert exported.returncode == 0
    lines = exported.stdout.splitlines()
    assert lines[0] == "identity,date,charged_kwh,discharged_kwh"
    assert lines[1].startswith(f"SN-{bank.tag}-a,") and lines[1].endswith(",0.200,0.200"), lines
    bank.close()


async def test_a_grid_battery_runs_in_the_service_and_is_not_a_member(processes: Processes, tmp_path: Path,
                                                                      bus_address: str) -> None:
    bank = Bank()
    await bank.add("a")
    meter_name = f"{bank.tag}meter"
    grid = bank.name("grid")
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus_address)
    meter = subprocess.Popen([sys.executable, "-m", "aggregator.simulator.grid_meter", "--name", meter_name,
                              "--time-scale", "600", "--start", "2024-06-21T09:00", "--rate", "5"],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        state = tmp_path / "state"
        settings = {"meter": f"com.victronenergy.grid.{meter_name}", "capacityKwh": 100, "startDate": "2020-01-01",
                    "serviceName": grid, "maxPowerKw": 100000}
        local = await start_settings(tmp_path / "settings.json")  # as on a GX: localsettings assigns instances
        agg, proc = start_aggregator(processes, tmp_path, bank, stateDir=str(state), gridBatteries=[settings])
        await bank.value_is(grid, "/GridBattery/Status", "ok")
        # Its device instance is reserved in localsettings like the aggregate's own (the configured one).
        await eventually(lambda: f"batteryaggregator_{grid.rsplit('.', 1)[-1]}" in
                         (tmp_path / "settings.json").read_text(), timeout=10)
        assert "battery:100" in (tmp_path / "settings.json").read_text()
        assert await bank.read(grid, "/DeviceInstance") == 100

        async def exporting() -> bool:
            return (await bank.read(grid, "/GridBattery/LevelKwh") or 0) > 0

        await eventually(exporting, timeout=10)  # a June morning: solar exceeds the load
        await bank.value_is(agg, "/System/NrOfBatteries", 1)  # the grid battery is no member of the bank
        assert await bank.read(agg, "/Batteries/0/Service") == bank.name("a")
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        assert (state / "grid" / grid.rsplit(".", 1)[-1] / "grid_battery.json").exists()
        exported = await acli(bus_address, "grid-battery", "--csv", "--name", grid, "--state-dir", str(state))
        assert exported.returncode == 0, exported.stderr
        lines = exported.stdout.splitlines()
        assert lines[0].startswith("timestamp,level_kwh") and len(lines) >= 2, lines
    finally:
        meter.terminate()
        meter.wait(timeout=10)
        bank.close()
        if "local" in locals():
            local.service.close()
