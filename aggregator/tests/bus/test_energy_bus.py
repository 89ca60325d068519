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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from aggregator.battery.publish import preferred_instance
from aggregator.bus import client

from ..conftest import REPO, Busctl, Processes
from ..helpers import eventually
from .test_aggregate import Bank, bus_address, start_aggregator, start_settings  # noqa: F401  (fixture)

COUNTERS = {"History__ChargedEnergy": 10.0, "History__DischargedEnergy": 5.0}


def _value(busctl: Busctl, service: str, path: str) -> Any:
    return busctl.call_json(service, path, "GetValue")["data"][0]["data"]


def _publish_energy_now(busctl: Busctl, service: str) -> None:
    """Has the aggregate publish its energy paths now rather than at its next period (up to 5 s after a member's
    sample, 10 s for what time alone changes): a Remove of an id that is no external battery is refused and
    changes nothing, and a refused call publishes at once like every report. What is published is the ledger as
    it is, so a wrong total still shows."""
    refused = busctl.run("call", service, "/", "org.batteryaggregator.Energy", "Remove", "s", "no-such-battery",
                         check=False)
    assert refused.returncode != 0 and "is not an external battery" in refused.stderr, refused


async def _totals_are(busctl: Busctl, service: str, charged: float, discharged: float, now: bool = False) -> None:
    """Poll the aggregate's totals with busctl (an independent client) until they are these kWh; with `now`,
    each poll first has them published (_publish_energy_now) instead of waiting for the period."""
    def read() -> tuple[Any, Any]:
        if now:
            _publish_energy_now(busctl, service)
        return _value(busctl, service, "/History/ChargedEnergy"), _value(busctl, service, "/History/DischargedEnergy")

    async def check() -> tuple[Any, Any]:
        got = await asyncio.get_running_loop().run_in_executor(None, read)
        assert isinstance(got[0], float) and abs(got[0] - charged) < 1e-6 and abs(got[1] - discharged) < 1e-6, got
        return got

    await eventually(check, timeout=10, interval=0.2)


def _cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=address)
    return subprocess.run([sys.executable, "-m", "aggregator", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=30)


async def acli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.get_running_loop().run_in_executor(None, lambda: _cli(address, *args))


async def test_a_reload_that_gives_two_services_one_id_counts_the_duplicate_once(processes: Processes,
                                                                                 tmp_path: Path,
                                                                                 busctl: Busctl) -> None:
    """Two services without a /Serial that a reloaded config gives the same id (energy.members.<ref>.id) are one
    pack: counted once in the DC values and the count as soon as the config is applied, not at the next join."""
    bank = Bank()
    await bank.add("a", Serial="", Dc__0__Current=10.0)
    await bank.add("b", Serial="", Dc__0__Current=10.0)
    name = bank.name("agg")
    path = tmp_path / "config.json"
    base = {"serviceName": name, "startupBatteryWait": 5, "stateDir": str(tmp_path / "state")}
    path.write_text(json.dumps(base))
    proc = processes.start("run", "--config", str(path), "--exit-delay", "0")
    await bank.value_is(name, "/Dc/0/Current", 20.0)
    assert await bank.read(name, "/System/NrOfBatteries") == 2
    ids = {"name:Pack a": {"id": "shed"}, "name:Pack b": {"id": "shed"}}
    path.write_text(json.dumps({**base, "energy": {"members": ids}}))
    proc.send_signal(signal.SIGHUP)
    await bank.value_is(name, "/System/NrOfBatteries", 1)
    assert await bank.read(name, "/Dc/0/Current") == 10.0
    assert "not counted twice" in await bank.read(name, "/Aggregator/Status")
    shown = f"shed: {bank.name('a')}, {bank.name('b')} (counted once, from "

    async def counted_once() -> bool:
        try:
            await asyncio.get_running_loop().run_in_executor(None, _publish_energy_now, busctl, name)
            return str(await bank.read(name, "/Energy/Duplicates")).startswith(shown)
        except (client.CallError, AssertionError):  # the energy paths are added at the first tick
            return False

    await eventually(counted_once, timeout=15)
    path.write_text(json.dumps(base))  # the ids taken away: two packs again
    proc.send_signal(signal.SIGHUP)
    await bank.value_is(name, "/System/NrOfBatteries", 2)
    assert await bank.read(name, "/Dc/0/Current") == 20.0
    bank.close()


async def test_a_member_counter_reset_continues_the_totals(processes: Processes, tmp_path: Path,
                                                           busctl: Busctl) -> None:
    bank = Bank()
    pack = await bank.add("a", **COUNTERS)
    agg, _ = start_aggregator(processes, tmp_path, bank, stateDir=str(tmp_path / "state"))
    await bank.value_is(agg, "/Batteries/0/Identity", f"SN-{bank.tag}-a")
    # Each step handled before the next (a barrier, not the totals: they are published at most every 5 s).
    pack.set_values({"/History/ChargedEnergy": 10.1, "/History/DischargedEnergy": 5.1})
    await bank.barrier(agg, "a")
    pack.set_values({"/History/ChargedEnergy": 0.05, "/History/DischargedEnergy": 0.0})  # the BMS restarted
    await bank.barrier(agg, "a")
    pack.set_value("/History/ChargedEnergy", 0.15)
    # 0.1 before the restart, 0.05 up to its first value, 0.1 since; nothing discharged after it
    await _totals_are(busctl, agg, 0.25, 0.1)
    await bank.value_is(agg, "/Batteries/0/History/ChargedEnergy", 0.25)
    bank.close()


async def test_one_battery_under_two_services_is_counted_once_and_named(processes: Processes, tmp_path: Path,
                                                                        busctl: Busctl) -> None:
    bank = Bank()
    can = await bank.add("can", Serial="SN-SHARED", **COUNTERS)
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
    await _totals_are(busctl, agg, 0.1, 0.0, now=True)
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
    await _totals_are(busctl, agg, 5.1, 2.0)  # the first report's totals are its lifetime energy
    sent = await asyncio.get_running_loop().run_in_executor(None, lambda: subprocess.run(
        ["dbus-send", f"--bus={bus_address}", "--print-reply", f"--dest={agg}", "/",
         "org.batteryaggregator.Energy.ReportValues", "string:shed", "double:5.2", "double:2.1", "double:42",
         "double:-1"], capture_output=True, text=True, timeout=10))
    assert sent.returncode == 0 and "5.200 kWh charged" in sent.stdout, sent
    await _totals_are(busctl, agg, 5.2, 2.1)
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
    await _totals_are(busctl, agg, 5.3, 2.1)
    assert await bank.read(agg, "/Energy/Status") == "ok"
    bank.close()


async def test_kill_9_and_restart_keeps_the_totals(processes: Processes, tmp_path: Path, busctl: Busctl) -> None:
    bank = Bank()
    pack = await bank.add("a", **COUNTERS)
    state = tmp_path / "state"
    agg, proc = start_aggregator(processes, tmp_path, bank, stateDir=str(state))
    await bank.value_is(agg, "/Batteries/0/Identity", f"SN-{bank.tag}-a")
    pack.set_values({"/History/ChargedEnergy": 10.1, "/History/DischargedEnergy": 5.2})
    await _totals_are(busctl, agg, 0.1, 0.2, now=True)
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
    meter = subprocess.Popen([sys.executable, "-m", "aggregator_dev.simulator.grid_meter", "--name", meter_name,
                              "--time-scale", "600", "--start", "2024-06-21T09:00", "--rate", "5"],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        state = tmp_path / "state"
        settings = {"meter": f"com.victronenergy.grid.{meter_name}", "capacityKwh": 100, "startDate": "2020-01-01",
                    "startLevelKwh": 0, "serviceName": grid, "maxPowerKw": 100000}
        local = await start_settings(tmp_path / "settings.json")  # as on a GX: localsettings assigns instances
        agg, proc = start_aggregator(processes, tmp_path, bank, stateDir=str(state), gridBatteries=[settings])
        await bank.value_is(grid, "/GridBattery/Status", "ok")
        # Its device instance is reserved in localsettings like the aggregate's own (one derived from its name).
        await eventually(lambda: f"batteryaggregator_{grid.rsplit('.', 1)[-1]}" in
                         (tmp_path / "settings.json").read_text(), timeout=10)
        assert f"battery:{preferred_instance(grid)}" in (tmp_path / "settings.json").read_text()
        assert await bank.read(grid, "/DeviceInstance") == preferred_instance(grid)
        # Its /CustomName is kept in localsettings too, as our other services' are.
        assert await client.set_value(bank.reader, grid, "/CustomName", "Net metering") == 0
        await eventually(lambda: json.loads((tmp_path / "settings.json").read_text()).get(
            f"/Settings/BatteryAggregator/batteryaggregator_{grid.rsplit('.', 1)[-1]}/CustomName") == "Net metering",
            timeout=10)

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


# ---- external batteries, the HTTP endpoint, the GX's time zone ------------------------------------------------

def _request(port: int, path: str, data: bytes, token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def arequest(port: int, path: str, body: Any, token: str | None = None) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await asyncio.get_running_loop().run_in_executor(None, lambda: _request(port, path, data, token))


async def _garage(busctl: Busctl, agg: str, charged: float) -> subprocess.CompletedProcess[str]:
    return await busctl.arun("call", agg, "/", "org.batteryaggregator.Energy", "ReportValues", "sdddd", "garage",
                             str(charged), "0", "50", "100", check=False)


async def test_external_lifetime_totals_typos_and_two_batteries_under_one_id(
        processes: Processes, tmp_path: Path, busctl: Busctl, bus_address: str) -> None:
    """External batteries' lifetime totals, a typo and two batteries under one id, through the CLI and busctl,
    read back with busctl and our client."""
    bank = Bank()
    await bank.add("a", Soc=50.0, InstalledCapacity=100.0)  # no counters, no current: 0 kWh
    agg, _ = start_aggregator(processes, tmp_path, bank, stateDir=str(tmp_path / "state"))
    await bank.value_is(agg, "/Batteries/0/State", "online")

    # 2. A first report's totals are the battery's lifetime energy: shown on its row and summed.
    first = await acli(bus_address, "report", "homey", "--charged", "2010.66", "--discharged", "1678.79", "--soc",
                       "60", "--service", agg)
    assert first.returncode == 0 and "2010.660 kWh charged" in first.stdout, (first.stdout, first.stderr)
    await _totals_are(busctl, agg, 2010.66, 1678.79)
    assert _value(busctl, agg, "/Energy/External/0/ChargedEnergy") == 2010.66
    assert _value(busctl, agg, "/Energy/External/0/DischargedEnergy") == 1678.79

    # 3. A typo is refused and changes nothing: the next correct report is taken.
    assert (await acli(bus_address, "report", "typo", "--charged", "901.1", "--discharged", "0", "--soc", "50",
                       "--service", agg)).returncode == 0
    typo = await acli(bus_address, "report", "typo", "--charged", "9011.2", "--discharged", "0", "--soc", "50",
                      "--service", agg)
    assert typo.returncode == 1 and "charged +8110.1 kWh" in typo.stderr, typo.stderr
    fixed = await acli(bus_address, "report", "typo", "--charged", "901.3", "--discharged", "0", "--soc", "50",
                       "--service", agg)
    assert fixed.returncode == 0, fixed.stderr
    await _totals_are(busctl, agg, 2010.66 + 901.3, 1678.79)

    # 3. Two batteries under one id: the reports alternate between two series; a conflict naming the id.
    assert (await _garage(busctl, agg, 100.0)).returncode == 0
    assert (await _garage(busctl, agg, 500.0)).returncode != 0  # once: could be a typo
    assert (await _garage(busctl, agg, 100.1)).returncode == 0
    conflict = await _garage(busctl, agg, 500.1)
    assert conflict.returncode != 0 and "'garage' gets the totals of two batteries" in conflict.stderr, conflict
    assert "report running totals" not in conflict.stderr
    await bank.value_is(agg, "/Energy/Status", "two batteries report under one id: garage")
    await _totals_are(busctl, agg, 2010.66 + 901.3 + 100.1, 1678.79)
    bank.close()


async def test_external_rows_survive_a_restart_are_capped_and_can_be_removed(
        processes: Processes, tmp_path: Path, busctl: Busctl, bus_address: str) -> None:
    """rows restored after a restart, energy.maxExternal, and Remove by CLI, D-Bus and HTTP."""
    bank = Bank()
    await bank.add("a", Soc=50.0, InstalledCapacity=100.0)
    port = _free_port()
    config = {"stateDir": str(tmp_path / "state"), "energy": {"httpPort": port, "maxExternal": 3}}
    agg, proc = start_aggregator(processes, tmp_path, bank, **config)
    await bank.value_is(agg, "/Batteries/0/State", "online")
    for ident, charged, soc in (("homey", 2010.66, 60), ("typo", 901.3, 50), ("garage", 100.1, 50)):
        done = await acli(bus_address, "report", ident, "--charged", str(charged), "--discharged", "1", "--soc",
                          str(soc), "--service", agg)
        assert done.returncode == 0, done.stderr
    code, body = await arequest(port, "/report", {"id": "fourth", "charged": 1, "discharged": 1, "soc": 50})
    assert code == 400 and "at most 3 (energy.maxExternal)" in body["error"], body

    # The rows survive a restart, and the next report is measured against the saved anchor.
    proc.terminate()
    assert proc.wait(timeout=10) == 0
    agg, proc = start_aggregator(processes, tmp_path, bank, **config)
    await _totals_are(busctl, agg, 2010.66 + 901.3 + 100.1, 3.0)
    rows = {await bank.read(agg, f"/Energy/External/{k}/Id"): k for k in range(3)}
    assert set(rows) == {"homey", "typo", "garage"}
    assert await bank.read(agg, f"/Energy/External/{rows['homey']}/Soc") == 60.0
    assert await bank.read(agg, f"/Energy/External/{rows['homey']}/ChargedEnergy") == 2010.66
    assert (await acli(bus_address, "report", "homey", "--charged", "2010.7", "--discharged", "1", "--soc", "61",
                       "--service", agg)).returncode == 0
    await _totals_are(busctl, agg, 2010.7 + 901.3 + 100.1, 3.0)

    # Removed by the CLI, by D-Bus and by HTTP: the energy leaves the totals, the rows turn invalid.
    removed = await acli(bus_address, "report", "--remove", "typo", "--service", agg)
    assert removed.returncode == 0 and "typo: removed" in removed.stdout, removed.stderr
    await _totals_are(busctl, agg, 2010.7 + 100.1, 2.0)
    assert await bank.read(agg, f"/Energy/External/{rows['typo']}/Id") is None
    await busctl.arun("call", agg, "/", "org.batteryaggregator.Energy", "Remove", "s", "garage")
    await _totals_are(busctl, agg, 2010.7, 1.0)
    code, body = await arequest(port, "/remove", {"id": "homey"})
    assert code == 200 and body["ok"], body
    await _totals_are(busctl, agg, 0.0, 0.0)
    unknown = await acli(bus_address, "report", "--remove", "homey", "--service", agg)
    assert unknown.returncode == 1 and "'homey' is not an external battery" in unknown.stderr
    code, body = await arequest(port, "/report", {"id": "fourth", "charged": 1, "discharged": 1, "soc": 50})
    assert code == 200, body  # room again
    proc.terminate()
    assert proc.wait(timeout=10) == 0
    agg, proc = start_aggregator(processes, tmp_path, bank, **config)
    await _totals_are(busctl, agg, 1.0, 1.0)  # removed ids stay removed
    assert await bank.read(agg, "/Energy/External/0/Id") == "fourth"
    bank.close()


async def test_deep_or_oversized_json_is_answered_and_the_endpoint_goes_on(processes: Processes, tmp_path: Path,
                                                                           busctl: Busctl) -> None:
    """A body of "[" * 10000 (deeper than json.loads can parse) gets an error reply, and the endpoint goes on."""
    bank = Bank()
    await bank.add("a")
    port = _free_port()
    agg, _ = start_aggregator(processes, tmp_path, bank, stateDir=str(tmp_path / "state"), energy={"httpPort": port})
    await bank.value_is(agg, "/Batteries/0/State", "online")
    code, body = await arequest(port, "/report", b"[" * 10000)
    assert code == 400 and "nested too deeply" in body["error"], body
    code, body = await arequest(port, "/report", b"{" * 10000)
    assert code == 400, body
    code, body = await arequest(port, "/report", b"[" * 100000)
    assert code == 413 and "at most 16384 bytes" in body["error"], body
    code, body = await arequest(port, "/report", b"\xff\xfe{")
    assert code == 400 and "not JSON" in body["error"], body
    code, body = await arequest(port, "/report", {"id": "shed", "charged": 5, "discharged": 2, "soc": 40})
    assert code == 200 and body["ok"], body
    await _totals_are(busctl, agg, 5.0, 2.0)
    bank.close()


async def test_beyond_loopback_the_http_endpoint_needs_its_token(processes: Processes, tmp_path: Path,
                                                                 busctl: Busctl) -> None:
    """bound to 0.0.0.0 (with energy.httpToken, which the config then requires)."""
    bank = Bank()
    await bank.add("a")
    port, token = _free_port(), "a-token-of-20-chars!"
    agg, _ = start_aggregator(processes, tmp_path, bank, stateDir=str(tmp_path / "state"),
                              energy={"httpPort": port, "httpBind": "0.0.0.0", "httpToken": token})
    await bank.value_is(agg, "/Batteries/0/State", "online")
    good = {"id": "shed", "charged": 5, "discharged": 2, "soc": 40}
    code, body = await arequest(port, "/report", good)
    assert code == 401 and "Authorization: Bearer" in body["error"], body
    code, body = await arequest(port, "/report", good, token="wrong-token-of-20-chars")
    assert code == 401
    code, body = await arequest(port, "/report", good, token=token)
    assert code == 200 and body["ok"], body
    await _totals_are(busctl, agg, 5.0, 2.0)
    assert (await arequest(port, "/remove", {"id": "shed"}))[0] == 401
    code, body = await arequest(port, "/remove", {"id": "shed"}, token=token)
    assert code == 200, body
    await _totals_are(busctl, agg, 0.0, 0.0)
    checked = await acli(processes.address, "check", str(_config_file(tmp_path, {"energy": {
        "httpPort": port, "httpBind": "0.0.0.0"}})))
    assert checked.returncode == 1 and "httpToken is required" in checked.stdout, checked.stdout
    bank.close()


def _config_file(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "check.json"
    path.write_text(json.dumps(config))
    return path


def _zones_with_other_dates() -> tuple[str, str]:
    """Two zones whose dates now differ from each other and from UTC's (a GX's process zone)."""
    return ("Etc/GMT-14", "Etc/GMT+12") if datetime.now(timezone.utc).hour >= 12 else ("Etc/GMT+12", "Etc/GMT-14")


async def test_daily_energy_follows_the_time_zone_set_on_the_gx(processes: Processes, tmp_path: Path,
                                                                busctl: Busctl, bus_address: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """the service runs in UTC, the user's zone is in localsettings; the daily buckets take
    its dates, and follow a change of it."""
    monkeypatch.setenv("TZ", "UTC")  # the processes' own zone, as on a GX
    first_zone, second_zone = _zones_with_other_dates()
    local = await start_settings()
    try:
        assert local.add("/Settings/System/TimeZone", first_zone, "s") == 0
        bank = Bank()
        pack = await bank.add("a", **COUNTERS)
        state = tmp_path / "state"
        agg, proc = start_aggregator(processes, tmp_path, bank, stateDir=str(state))
        await bank.value_is(agg, "/Batteries/0/Identity", f"SN-{bank.tag}-a")
        await eventually(lambda: f"dates follow the time zone {first_zone}" in processes.output(proc), timeout=10)
        pack.set_value("/History/ChargedEnergy", 10.1)
        await _totals_are(busctl, agg, 0.1, 0.0, now=True)
        assert local.set("/Settings/System/TimeZone", second_zone) == 0
        await eventually(lambda: f"dates follow the time zone {second_zone}" in processes.output(proc), timeout=10)
        pack.set_value("/History/ChargedEnergy", 10.3)
        await _totals_are(busctl, agg, 0.3, 0.0, now=True)
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        exported = await acli(bus_address, "energy", "--csv", "--state-dir", str(state))
        rows = exported.stdout.splitlines()[1:]
        dates = [datetime.now(ZoneInfo(zone)).date().isoformat() for zone in (first_zone, second_zone)]
        assert rows == [f"SN-{bank.tag}-a,{dates[0]},0.100,0.000", f"SN-{bank.tag}-a,{dates[1]},0.200,0.000"] \
            or rows == [f"SN-{bank.tag}-a,{dates[1]},0.200,0.000", f"SN-{bank.tag}-a,{dates[0]},0.100,0.000"], rows
        bank.close()
    finally:
        local.service.close()


# ---- Homey flow cards for Sessy batteries ------------------------------------------------------------------

async def test_sessy_reports_typos_rollbacks_twins_decimal_commas_and_the_energy_table(
        processes: Processes, tmp_path: Path, busctl: Busctl, bus_address: str) -> None:
    """The service as a process; reports by the CLI and HTTP as a Homey flow sends them; read back with busctl
    and `battery-aggregator energy`."""
    bank = Bank()
    await bank.add("a", Soc=50.0, InstalledCapacity=100.0)  # no counters, no current: 0 kWh
    port = _free_port()
    state = tmp_path / "state"
    agg, proc = start_aggregator(processes, tmp_path, bank, stateDir=str(state),
                                 # reports seconds apart here, not 15 minutes: the power bound must not bind
                                 energy={"httpPort": port, "members": {"sessy": {"capacityKwh": 5,
                                                                                 "maxPowerKw": 100000}}})
    await bank.value_is(agg, "/Batteries/0/State", "online")

    async def sessy(charged: str, discharged: str = "1678,79", soc: str = "61") -> subprocess.CompletedProcess[str]:
        return await acli(bus_address, "report", "sessy", "--charged", charged, "--discharged", discharged,
                          "--soc", soc, "--service", agg)

    # The decimal comma of the Sessy screen, in the CLI and over HTTP.
    first = await sessy("2011,12")
    assert first.returncode == 0 and "2011.120 kWh charged, 1678.790 kWh discharged" in first.stdout, first
    await _totals_are(busctl, agg, 2011.12, 1678.79)
    thousands = await sessy("2.011,2")
    assert thousands.returncode == 1 and "a decimal comma (2010,66), no thousands separators" in thousands.stderr
    # 2019.12 for 2011.12: more than a 5 kWh battery can take; refused, and the next correct report is taken.
    typo = await sessy("2019,12")
    assert typo.returncode == 1 and "cannot fit in a battery of 5 kWh" in typo.stderr, typo.stderr
    code, body = await arequest(port, "/report", {"id": "sessy", "charged": "2011,35", "discharged": "1678,79",
                                                  "soc": "61,5"})
    assert code == 200 and body["ok"], body
    await _totals_are(busctl, agg, 2011.35, 1678.79)
    await bank.value_is(agg, "/Energy/External/0/Soc", 61.5)
    # A typo small enough to be possible is taken, then rolled back by the next report; the row says so.
    assert (await sessy("2013,35")).returncode == 0
    await _totals_are(busctl, agg, 2013.35, 1678.79)
    fixed = await sessy("2011,5")
    assert fixed.returncode == 0 and "was rolled back" in fixed.stdout, fixed
    await _totals_are(busctl, agg, 2011.5, 1678.79)
    assert "(charged 2013.35, discharged 1678.79 kWh) was rolled back" in \
        await bank.read(agg, "/Energy/External/0/LastCorrection")
    await bank.value_is(agg, "/Energy/Status", "reports rolled back or taken on confirmation: sessy")
    # The same battery in a second flow under another id: warned, on the bus and in the answer.
    twin = await acli(bus_address, "report", "sessy-copy", "--charged", "2011,5", "--discharged", "1678,79",
                      "--soc", "61", "--service", agg)
    assert twin.returncode == 0 and "warning: sessy reported the same totals" in twin.stdout, twin
    status = await bank.read(agg, "/Energy/Status")
    assert "the same totals under two ids (one battery counted twice?): sessy, sessy-copy" in status, status
    assert (await acli(bus_address, "report", "--remove", "sessy-copy", "--service", agg)).returncode == 0

    # `energy`: the rows, the totals over all batteries and the average level the aggregate published.
    await bank.value_is(agg, "/Energy/AverageSoc", 55.5)  # (50 + 61) / 2
    proc.terminate()  # a clean stop saves
    assert proc.wait(timeout=10) == 0
    shown = await acli(bus_address, "energy", "--state-dir", str(state))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert any(line.startswith("sessy ") and line.endswith(" 61.0") for line in lines), lines
    assert any(line.startswith("total (2 batteries)") and "2011.500" in line and "1678.790" in line
               for line in lines), lines
    assert "average level 55.5 % (weighted by capacity" in lines[-1] and "of 2 batteries, at " in lines[-1], lines
    bank.close()
