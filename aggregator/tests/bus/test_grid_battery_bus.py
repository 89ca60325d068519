"""The grid battery on a real bus: the grid-meter simulator as a process, the service, busctl as the reader.

A simulated year runs in about 7 s: the battery empties in winter (import beyond it), fills in spring and
loses export in summer, forgets its level on the reset day, and does not move when the meter's counters are
reset. A kill -9 of the service process and a restart keep the level.
"""
from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest

from aggregator.bus import client
from aggregator.bus.lib import connect
from aggregator.features.grid_battery.runtime import (GRID_BATTERY_PRODUCT_ID, STATE_FILE, GridBatteryService,
                                                      history_csv)
from aggregator.features.grid_battery.settings import GridBatterySettings
from aggregator_dev.simulator.grid_meter import parse_start

from ..conftest import REPO, Busctl, Processes
from ..helpers import eventually

YEAR_SECONDS = 365 * 86400
YEAR_SCALE = YEAR_SECONDS / 7.0  # a simulated year in 7 s


class SimClock:
    """The service's clock in the year test: runs `scale` times faster and pauses with the meter."""

    def __init__(self, epoch: float, scale: float) -> None:
        self.scale = scale
        self._base = epoch
        self._since: float | None = None  # wall time it was resumed at; None = paused

    def __call__(self) -> float:
        if self._since is None:
            return self._base
        return self._base + (time.time() - self._since) * self.scale

    def pause(self) -> None:
        self._base, self._since = self(), None

    def resume(self) -> None:
        self._since = time.time()


async def value(busctl: Busctl, service: str, path: str) -> Any:
    """A value as busctl reads it; None when invalid (an empty array)."""
    reply = await busctl.acall_json(service, path, "GetValue")
    variant = reply["data"][0]
    return None if variant["type"] == "ai" else variant["data"]


async def set_value(busctl: Busctl, service: str, path: str, signature: str, data: str) -> int:
    reply = await busctl.acall_json(service, path, "SetValue", "v", signature, data)
    return reply["data"][0]


async def on_bus(busctl: Busctl, name: str, timeout: float = 15.0) -> None:
    async def listed() -> bool:
        return name in (await busctl.arun("list", "--no-pager", "--acquired", check=False)).stdout
    await eventually(listed, timeout=timeout, interval=0.1)


async def meter_barrier(service: GridBatteryService, meter: str) -> None:
    """A call to the meter on the service's own connection: its answer comes after every signal the meter sent
    before (one sender, one receiver: in order), and each is handled and published as it is read."""
    assert service.monitor is not None
    await client.get_value(service.monitor.bus, meter, "/Ac/Power")


async def test_a_simulated_year(processes: Processes, busctl: Busctl, tmp_path: Path) -> None:
    battery = "com.victronenergy.battery.gridyear"
    meter = "com.victronenergy.grid.house"
    settings = GridBatterySettings(meter="name:Simulated grid meter", capacityKwh=200, startDate=date(2023, 1, 1),
                                   resetDate="07-01", serviceName=battery, deviceInstance=101)
    clock = SimClock(parse_start("2023-01-01"), YEAR_SCALE)
    service = GridBatteryService(await connect(), settings, tmp_path, clock, save_interval=1.0)
    await service.start()
    try:
        # Published before the meter exists: the stored level, and why power is invalid.
        assert (await value(busctl, battery, "/GridBattery/Status")).startswith("meter missing")
        assert await value(busctl, battery, "/Dc/0/Power") is None
        assert await value(busctl, battery, "/Soc") == 0.0
        assert await value(busctl, battery, "/Dc/0/Voltage") == 51.2
        assert await value(busctl, battery, "/InstalledCapacity") == pytest.approx(200000 / 51.2, abs=0.01)
        assert await value(busctl, battery, "/DeviceInstance") == 101
        assert await value(busctl, battery, "/ProductId") == GRID_BATTERY_PRODUCT_ID
        # A /CustomName like every battery's (kept in localsettings when the service runs it: test_energy_bus).
        assert await value(busctl, battery, "/CustomName") == ""
        assert await set_value(busctl, battery, "/CustomName", "s", "Net metering") == 0
        assert await value(busctl, battery, "/CustomName") == "Net metering"

        processes.start_module("aggregator_dev.simulator.grid_meter", "--name", "house", "--time-scale", "0",
                      "--start", "2023-01-01", "--rate", "30")
        await on_bus(busctl, meter)
        await eventually(lambda: _is(value(busctl, battery, "/GridBattery/Status"), "ok"), timeout=5)
        assert await value(busctl, battery, "/GridBattery/Meter") == meter

        clock.resume()
        assert await set_value(busctl, meter, "/Sim/TimeScale", "d", str(YEAR_SCALE)) == 0

        # Winter: the grid battery is empty and the import goes beyond it.
        await eventually(lambda: (service.battery.beyond_kwh or 0) > 50, timeout=6)
        # Spring: it fills. Halfway, the meter is paused and its counters reset: the level stays.
        await eventually(lambda: 60 < service.battery.level_kwh < 140, timeout=8, interval=0.01)
        clock.pause()
        assert await set_value(busctl, meter, "/Sim/TimeScale", "d", "0") == 0
        await meter_barrier(service, meter)
        level = await value(busctl, battery, "/GridBattery/LevelKwh")
        charged = await value(busctl, battery, "/History/ChargedEnergy")
        assert 30 < level < 170
        assert await set_value(busctl, meter, "/Sim/ResetCounters", "i", "1") == 0
        await eventually(lambda: service.battery.counter_resets == 2, timeout=5)  # handled and published at once
        await meter_barrier(service, meter)
        assert await value(busctl, battery, "/GridBattery/LevelKwh") == level
        assert await value(busctl, battery, "/History/ChargedEnergy") == charged
        clock.resume()
        assert await set_value(busctl, meter, "/Sim/TimeScale", "d", str(YEAR_SCALE)) == 0

        # Late spring: full, then the export is lost.
        await eventually(lambda: _is(value(busctl, battery, "/Soc"), 100.0), timeout=8, interval=0.05)
        await eventually(lambda: _above(value(busctl, battery, "/GridBattery/LostExportKwh"), 10), timeout=8)
        # Full, the remaining capacity is the installed one (the accelerated year may already be discharging
        # it at this instant, so wait for a full moment rather than read once).
        full_ah = 200000 / 51.2
        await eventually(lambda: _near(value(busctl, battery, "/Capacity"), full_ah), timeout=8, interval=0.02)
        # The reset day forgets the level.
        await eventually(lambda: service.battery.last_reset == date(2023, 7, 1), timeout=8)
        assert service.battery.forfeited_kwh > 100
        # On to the end of the year.
        await eventually(lambda: clock() > parse_start("2024-01-01"), timeout=10)
        clock.pause()
        await set_value(busctl, meter, "/Sim/TimeScale", "d", "0")
        await meter_barrier(service, meter)
        got = {p: await value(busctl, battery, p) for p in (
            "/GridBattery/LevelKwh", "/History/ChargedEnergy", "/History/DischargedEnergy",
            "/GridBattery/LostExportKwh", "/GridBattery/ImportBeyondKwh")}
        level, charged, discharged, lost, beyond = got.values()
        assert 0 <= level <= 200 and lost > 10 and beyond > 50
        assert level == pytest.approx(charged - discharged - lost + beyond - service.battery.forfeited_kwh, abs=0.01)
        power = await value(busctl, battery, "/Dc/0/Power")
        current = await value(busctl, battery, "/Dc/0/Current")
        assert current == pytest.approx(power / 51.2, abs=0.01)
    finally:
        await service.stop()

    rows = list(csv.DictReader(io.StringIO(history_csv(tmp_path))))
    days = {datetime.fromisoformat(r["timestamp"]).date(): r for r in rows}
    assert len(days) > 100  # a row for the days a sample arrived on (one per ~1.7 simulated days)
    after_reset = min(d for d in days if d >= date(2023, 7, 1))
    assert float(days[after_reset]["level_kwh"]) < 60
    assert max(float(r["level_kwh"]) for r in rows) == pytest.approx(200.0)
    assert sum(float(r["overflow_kwh"]) for r in rows) == pytest.approx(service.battery.overflow_kwh, abs=0.5)


async def _is(awaitable: Any, expected: Any) -> bool:
    return await awaitable == expected


async def _near(read: Any, expected: float) -> bool:
    got = await read
    return got is not None and abs(got - expected) <= 0.01


async def _above(awaitable: Any, limit: float) -> bool:
    got = await awaitable
    return got is not None and got > limit


async def test_kill_9_and_restart_keep_the_level(processes: Processes, busctl: Busctl, tmp_path: Path) -> None:
    battery = "com.victronenergy.battery.gridk9"
    meter = "com.victronenergy.grid.k9"
    scale, start = 3600.0, "2023-06-21T10:00"
    origin = time.time()
    processes.start_module("aggregator_dev.simulator.grid_meter", "--name", "k9", "--time-scale", str(scale),
                           "--start", start,
                  "--rate", "10", "--device-instance", "31")
    config = json.dumps({"meter": 31, "capacityKwh": 0, "startDate": "2023-01-01", "startLevelKwh": 0,
                         "deviceInstance": 102, "serviceName": battery})
    state_dir = tmp_path / "state"
    args = ("--config", config, "--state-dir", str(state_dir), "--save-interval", "0.2", "--time-scale",
            str(scale), "--clock-origin", str(origin), "--clock-epoch", str(parse_start(start)))
    first = processes.start_module("aggregator.features.grid_battery.runtime", *args)
    await on_bus(busctl, battery)
    await eventually(lambda: _above(value(busctl, battery, "/GridBattery/LevelKwh"), 2.0), timeout=15)
    assert await value(busctl, battery, "/Soc") is None  # unlimited: no percentage
    assert await value(busctl, battery, "/InstalledCapacity") is None

    await on_bus(busctl, meter)
    assert await set_value(busctl, meter, "/Sim/TimeScale", "d", "0") == 0

    async def saved_level() -> Any:  # the meter stands still: the level published and the one saved agree
        level = await value(busctl, battery, "/GridBattery/LevelKwh")
        data = json.loads((state_dir / STATE_FILE).read_text())
        return (level,) if round(data["battery"]["level"], 3) == level else None

    (level,) = await eventually(saved_level, timeout=5)
    first.send_signal(signal.SIGKILL)
    assert await asyncio.get_running_loop().run_in_executor(None, first.wait) == -signal.SIGKILL

    async def gone() -> bool:
        return battery not in (await busctl.arun("list", "--no-pager", "--acquired", check=False)).stdout
    await eventually(gone, timeout=5)

    second = processes.start_module("aggregator.features.grid_battery.runtime", *args)
    await on_bus(busctl, battery)
    assert await value(busctl, battery, "/GridBattery/LevelKwh") == level  # loaded before the name is taken
    await eventually(lambda: _is(value(busctl, battery, "/GridBattery/Status"), "ok"), timeout=5)
    assert await value(busctl, battery, "/GridBattery/LevelKwh") == level

    assert await set_value(busctl, meter, "/Sim/TimeScale", "d", str(scale)) == 0
    await eventually(lambda: _above(value(busctl, battery, "/GridBattery/LevelKwh"), level + 1.0), timeout=10)
    second.terminate()
    assert await asyncio.get_running_loop().run_in_executor(None, second.wait) == 0
    assert json.loads((state_dir / STATE_FILE).read_text())["battery"]["level"] > level + 1.0


def test_a_bad_config_exits_1_naming_the_keys(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "aggregator.features.grid_battery.runtime", "--config",
                             '{"meter": "com.victronenergy.battery.x", "capacityKwh": -1}', "--state-dir",
                             str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert result.returncode == 1
    for key in ("meter", "capacityKwh", "startDate", "-1"):
        assert key in result.stderr


@pytest.mark.parametrize("resolution,scale", [(0.1, 100.0), (1.0, 1000.0)])
async def test_a_meter_publishing_in_steps_is_counted(processes: Processes, busctl: Busctl, tmp_path: Path,
                                                      resolution: float, scale: float) -> None:
    """A meter showing its counters in 0.1 (or 1) kWh steps, read many times a (scaled) second, moves one step
    in less time than the connection's 100 kW allow for it, and the step still counts: the battery counts what
    the meter's export counter moved by, a step weighed against the time since the counter last moved, plus one
    step (however little energy crossed it, a counter moves by a whole step)."""
    tag = str(resolution).replace(".", "")
    battery, meter = f"com.victronenergy.battery.gridq{tag}", f"com.victronenergy.grid.q{tag}"
    start = "2023-06-21T12:00"  # summer noon: ~4 kW export
    # The export counter a Wh below its next step: its first step comes right after the battery's first sample.
    processes.start_module("aggregator_dev.simulator.grid_meter", "--name", f"q{tag}", "--time-scale", "0",
                           "--start", start, "--rate", "20", "--resolution", str(resolution),
                           "--reverse", str(100 + resolution - 0.001), "--device-instance", "40")
    settings = GridBatterySettings(meter=40, capacityKwh=0, startDate=date(2023, 1, 1), startLevelKwh=0,
                                   serviceName=battery, deviceInstance=103)  # maxPowerKw: the default 100
    clock = SimClock(parse_start(start), scale)
    service = GridBatteryService(await connect(), settings, tmp_path, clock, save_interval=60.0)
    await service.start()
    try:
        await on_bus(busctl, meter)
        await eventually(lambda: _is(value(busctl, battery, "/GridBattery/Status"), "ok"), timeout=5)
        first = await value(busctl, meter, "/Ac/Energy/Reverse")  # the battery's anchor
        assert first == 100.0

        async def charged_is(kwh: float) -> bool:
            return await value(busctl, battery, "/History/ChargedEnergy") == pytest.approx(kwh, abs=1e-6)

        # The first step while the battery's clock stands still (no time at all since the anchor): only the
        # one-step allowance can take it.
        assert await set_value(busctl, meter, "/Sim/TimeScale", "d", str(scale)) == 0
        await eventually(lambda: charged_is(resolution), timeout=10, interval=0.1)
        clock.resume()  # then steps at the pace of the meter

        async def moved() -> bool:
            return (await value(busctl, meter, "/Ac/Energy/Reverse")) >= first + 3 * resolution
        await eventually(moved, timeout=20, interval=0.1)
        assert await set_value(busctl, meter, "/Sim/TimeScale", "d", "0") == 0
        clock.pause()
        last = await value(busctl, meter, "/Ac/Energy/Reverse")

        async def counted() -> Any:
            charged = await value(busctl, battery, "/History/ChargedEnergy")
            assert charged == pytest.approx(last - first, abs=1e-6), (charged, first, last)
            return charged
        await eventually(counted, timeout=5, interval=0.1)
        assert await value(busctl, battery, "/GridBattery/LevelKwh") == pytest.approx(last - first, abs=1e-6)
    finally:
        await service.stop()


async def test_daily_rows_follow_the_time_zone_set_on_the_gx(processes: Processes, busctl: Busctl,
                                                             tmp_path: Path) -> None:
    """The service process runs in UTC (as on a GX); its daily rows take the dates of the
    zone in localsettings' /Settings/System/TimeZone, follow a change of it, and the CSV shows its times."""
    from zoneinfo import ZoneInfo

    from aggregator_dev.simulator.localsettings import serve

    first_zone, second_zone = ("Etc/GMT-14", "Etc/GMT+12") if time.gmtime().tm_hour >= 12 else \
        ("Etc/GMT+12", "Etc/GMT-14")  # now on other dates than each other and than UTC
    local = await serve()
    try:
        assert local.add("/Settings/System/TimeZone", first_zone, "s") == 0
        battery, utc = "com.victronenergy.battery.gridtz", {"TZ": "UTC"}
        processes.start_module("aggregator_dev.simulator.grid_meter", "--name", "tz", "--rate", "5",
                               "--device-instance", "41", env=utc)
        state_dir = tmp_path / "state" / "grid" / "gridtz"
        config = json.dumps({"meter": 41, "startDate": "2020-01-01", "startLevelKwh": 0, "serviceName": battery,
                             "deviceInstance": 104})
        proc = processes.start_module("aggregator.features.grid_battery.runtime", "--config", config, "--state-dir",
                                      str(state_dir), "--save-interval", "0.2", env=utc)
        await on_bus(busctl, battery)
        await eventually(lambda: _is(value(busctl, battery, "/GridBattery/Status"), "ok"), timeout=10)
        dates = [datetime.now(ZoneInfo(zone)).date().isoformat() for zone in (first_zone, second_zone)]

        def days() -> set[str]:
            try:
                data = json.loads((state_dir / STATE_FILE).read_text())
            except (OSError, ValueError):
                return set()
            return {row[0] for row in data["battery"]["history"]}

        await eventually(lambda: days() == {dates[0]}, timeout=10)
        assert local.set("/Settings/System/TimeZone", second_zone) == 0
        await eventually(lambda: days() == set(dates), timeout=10)
        proc.terminate()
        assert await asyncio.get_running_loop().run_in_executor(None, proc.wait) == 0
        exported = await asyncio.get_running_loop().run_in_executor(None, lambda: subprocess.run(
            [sys.executable, "-m", "aggregator", "grid-battery", "--csv", "--name", battery, "--state-dir",
             str(tmp_path / "state")], cwd=REPO, capture_output=True, text=True, timeout=30,
            env={**os.environ, "TZ": "UTC"}))
        assert exported.returncode == 0, exported.stderr
        last = exported.stdout.splitlines()[-1]
        assert last.startswith(dates[1] + "T"), last  # the last sample's time, in the user's zone
    finally:
        local.service.close()


# ---- smart-me's virtual battery ------------------------------------------------------------------------------

async def test_a_new_grid_battery_keeps_its_level_after_a_kill_9_before_the_first_periodic_save(
        processes: Processes, busctl: Busctl, tmp_path: Path) -> None:
    """2.00 -> 0.10 kWh after a kill -9 at 100 s: nothing was saved before the first 180 s, so the restart had
    no anchor and counted from its own first sample. Now the first sample is saved at once."""
    battery, meter = "com.victronenergy.battery.gridnew", "com.victronenergy.grid.new"
    scale, start = 3600.0, "2023-06-21T10:00"
    origin = time.time()
    processes.start_module("aggregator_dev.simulator.grid_meter", "--name", "new", "--time-scale", str(scale),
                           "--start", start, "--rate", "10", "--device-instance", "42")
    config = json.dumps({"meter": 42, "startDate": "2023-06-21", "startLevelKwh": 0, "serviceName": battery})
    state_dir = tmp_path / "state"
    args = ("--config", config, "--state-dir", str(state_dir), "--time-scale", str(scale), "--clock-origin",
            str(origin), "--clock-epoch", str(parse_start(start)))  # the default save interval: 180 s
    first = processes.start_module("aggregator.features.grid_battery.runtime", *args)
    await on_bus(busctl, battery)
    await eventually(lambda: _above(value(busctl, battery, "/GridBattery/LevelKwh"), 2.0), timeout=15)
    await on_bus(busctl, meter)
    assert await set_value(busctl, meter, "/Sim/TimeScale", "d", "0") == 0
    await asyncio.sleep(0.4)
    level = await value(busctl, battery, "/GridBattery/LevelKwh")
    first.send_signal(signal.SIGKILL)
    assert await asyncio.get_running_loop().run_in_executor(None, first.wait) == -signal.SIGKILL
    assert (state_dir / STATE_FILE).exists()

    async def gone() -> bool:
        return battery not in (await busctl.arun("list", "--no-pager", "--acquired", check=False)).stdout
    await eventually(gone, timeout=5)
    processes.start_module("aggregator.features.grid_battery.runtime", *args)
    await on_bus(busctl, battery)
    # The meter's counters since the saved first sample: the whole level again.
    await eventually(lambda: _near(value(busctl, battery, "/GridBattery/LevelKwh"), level), timeout=10)


async def test_the_start_reading_counts_what_was_exported_before_the_first_sample(
        processes: Processes, busctl: Busctl, tmp_path: Path) -> None:
    """startDate today and 1.2 kWh already exported: the level started at 0 with status ok. Given the meter's
    counters at the start, they count; without them the status says what is missing."""
    start = "2023-06-21T10:00"
    for name, instance in (("rd", "43"), ("nr", "44")):
        processes.start_module("aggregator_dev.simulator.grid_meter", "--name", name, "--time-scale", "0",
                               "--start", start, "--rate", "5", "--device-instance", instance,
                               "--forward", "50", "--reverse", "101.2")
    read = GridBatterySettings(meter=43, startDate=date(2023, 6, 21), startImportKwh=49.5, startExportKwh=100,
                               serviceName="com.victronenergy.battery.gridrd")
    unread = GridBatterySettings(meter=44, startDate=date(2023, 6, 21), serviceName="com.victronenergy.battery.gridnr")
    services = [GridBatteryService(await connect(), settings, tmp_path / settings.serviceName, SimClock(
        parse_start(start), 1.0)) for settings in (read, unread)]
    for service in services:
        await service.start()
    try:
        rd, nr = (s.serviceName for s in (read, unread))
        await eventually(lambda: _is(value(busctl, rd, "/GridBattery/Status"), "ok"), timeout=10)
        assert await value(busctl, rd, "/GridBattery/LevelKwh") == pytest.approx(0.7)  # 1.2 out, 0.5 in
        assert await value(busctl, rd, "/GridBattery/Start") == \
            "the meter's counters on 2023-06-21 00:00 (startImportKwh 49.5, startExportKwh 100)"

        async def late() -> bool:
            return str(await value(busctl, nr, "/GridBattery/Status")).startswith("started late")
        await eventually(late, timeout=10)
        assert await value(busctl, nr, "/GridBattery/Status") == (
            "started late: counting from the first sample, 2023-06-21 10:00: the energy from 2023-06-21 to then "
            "is not counted (configure startImportKwh and startExportKwh, or startLevelKwh)")
        assert await value(busctl, nr, "/GridBattery/LevelKwh") == 0.0
    finally:
        for service in services:
            await service.stop()


async def test_a_new_day_is_saved_at_once_the_one_time_reset_and_the_load_profile(
        processes: Processes, busctl: Busctl, tmp_path: Path) -> None:
    """Saved on the first sample and on the change of day (not only every save interval, here an hour); the
    one-time reset date empties the battery at its midnight; the 15-minute profile is written and exported."""
    battery, meter, start = "com.victronenergy.battery.gridday", "com.victronenergy.grid.day", "2023-06-21T23:50"
    scale = 360.0  # six simulated minutes a second
    processes.start_module("aggregator_dev.simulator.grid_meter", "--name", "day", "--time-scale", "0",
                           "--start", start, "--rate", "10", "--device-instance", "45")
    settings = GridBatterySettings(meter=45, startDate=date(2023, 6, 21), startLevelKwh=5, capacityKwh=10,
                                   resetOnce=date(2023, 6, 22), serviceName=battery)
    clock = SimClock(parse_start(start), scale)
    state_dir = tmp_path / "grid" / "gridday"
    service = GridBatteryService(await connect(), settings, state_dir, clock, save_interval=3600.0)
    await service.start()
    try:
        await on_bus(busctl, meter)
        await eventually(lambda: _is(value(busctl, battery, "/GridBattery/Status"), "ok"), timeout=10)
        saved = json.loads((state_dir / STATE_FILE).read_text())  # the first sample is on disk at once
        assert saved["battery"]["started"] and saved["battery"]["import"][0] is not None
        assert await value(busctl, battery, "/GridBattery/LevelKwh") == 5.0
        clock.resume()
        assert await set_value(busctl, meter, "/Sim/TimeScale", "d", str(scale)) == 0

        def days() -> list[str]:
            return [row[0] for row in json.loads((state_dir / STATE_FILE).read_text())["battery"]["history"]]
        await eventually(lambda: days() == ["2023-06-21", "2023-06-22"], timeout=15)  # saved at the new day
        assert service.battery.last_reset == date(2023, 6, 22) and service.battery.forfeited_kwh > 4
        await eventually(lambda: _is(value(busctl, battery, "/GridBattery/LevelKwh"), 0.0), timeout=5)
        await eventually(lambda: clock() > parse_start("2023-06-22T00:20"), timeout=15)
        clock.pause()  # first: the battery's slot stays 00:15 however late the meter stops
        assert await set_value(busctl, meter, "/Sim/TimeScale", "d", "0") == 0
    finally:
        await service.stop()
    rows = (state_dir / "load_profile.csv").read_text().splitlines()
    assert rows[0] == "start,import_kwh,export_kwh,level_kwh"
    starts = [row.split(",")[0][:16] for row in rows[1:]]
    # The finished slots; the one in progress (00:15) is in the state and goes on after a restart.
    assert starts == ["2023-06-21T23:45", "2023-06-22T00:00"], starts
    assert json.loads((state_dir / STATE_FILE).read_text())["battery"]["slot"][0] == parse_start("2023-06-22T00:15")
    for row in rows[1:]:
        imported, exported, level = (float(x) for x in row.split(",")[1:])
        assert 0.02 < imported < 0.6 and exported == 0.0 and 0 <= level <= 5  # a June night's load
    exported = await asyncio.get_running_loop().run_in_executor(None, lambda: subprocess.run(
        [sys.executable, "-m", "aggregator", "grid-battery", "--profile", "--name", battery, "--state-dir",
         str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=30))
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.splitlines() == rows


async def test_two_grid_batteries_get_their_own_instances_and_keep_their_custom_names(
        processes: Processes, busctl: Busctl, tmp_path: Path) -> None:
    """A second grid battery was refused: both asked for deviceInstance 100. Now localsettings gives each its
    own, and /CustomName is kept there like the aggregate's."""
    from .test_aggregate import start_settings

    store = tmp_path / "settings.json"
    local = await start_settings(store)
    try:
        for name, instance in (("two1", "46"), ("two2", "47")):
            processes.start_module("aggregator_dev.simulator.grid_meter", "--name", name, "--time-scale", "0",
                                   "--rate", "2", "--device-instance", instance)
        first, second = "com.victronenergy.battery.gridtwo1", "com.victronenergy.battery.gridtwo2"
        config = tmp_path / "config.json"
        config.write_text(json.dumps({
            "serviceName": "com.victronenergy.battery.aggtwo", "stateDir": str(tmp_path / "state"),
            "startupBatteryWait": 1, "gridBatteries": [
                {"meter": 46, "startDate": "2023-01-01", "serviceName": first},
                {"meter": 47, "startDate": "2023-01-01", "serviceName": second}]}))
        daemon = processes.start("run", "--config", str(config))
        await on_bus(busctl, first)
        await on_bus(busctl, second)
        instances = {await value(busctl, name, "/DeviceInstance") for name in (first, second)}
        assert len(instances) == 2, instances
        assert await set_value(busctl, second, "/CustomName", "s", "Saldering") == 0
        await eventually(lambda: "Saldering" in store.read_text(), timeout=10)
        daemon.terminate()
        assert await asyncio.get_running_loop().run_in_executor(None, daemon.wait) == 0
        processes.start("run", "--config", str(config))
        await on_bus(busctl, second)
        await eventually(lambda: _is(value(busctl, second, "/CustomName"), "Saldering"), timeout=10)
        assert {await value(busctl, name, "/DeviceInstance") for name in (first, second)} == instances
    finally:
        local.service.close()


async def test_a_reload_applies_the_grid_batteries_in_place_and_their_connections_are_watched(
        busctl: Busctl, tmp_path: Path) -> None:
    """The grid batteries are a feature of the aggregate: a reload that adds one starts it without restarting the
    aggregate, and the host's connection watch covers their connections (one dropped ends the process with 2)."""
    from aggregator.features.grid_battery.feature import GridBatteryFeature
    from aggregator.host.daemon import Host, first_config

    first, second = "com.victronenergy.battery.gridwa", "com.victronenergy.battery.gridwb"
    config_path = tmp_path / "config.json"

    def write(*names: str) -> None:
        config_path.write_text(json.dumps({
            "serviceName": "com.victronenergy.battery.aggwatch", "stateDir": str(tmp_path / "state"),
            "startupBatteryWait": 1,
            "gridBatteries": [{"meter": 48, "startDate": "2023-01-01", "serviceName": n} for n in names]}))

    write(first)
    config = first_config(str(config_path), None)
    assert config is not None
    host = Host(str(config_path), os.environ["DBUS_SESSION_BUS_ADDRESS"])
    assert await host.start(config)
    aggregator = host.aggregator
    assert aggregator is not None
    serving = asyncio.get_running_loop().create_task(host.serve())
    try:
        await on_bus(busctl, first)
        assert first in dict(aggregator.connections())
        write(first, second)
        host.reload.set()
        await on_bus(busctl, second)
        assert host.aggregator is aggregator  # applied in place: the aggregate did not restart
        grid = next(f for f in aggregator.features if isinstance(f, GridBatteryFeature))
        await eventually(lambda: second in dict(aggregator.connections()), timeout=10)
        next(s for s in grid.running if s.settings.serviceName == second).bus.disconnect()
        assert await asyncio.wait_for(serving, 10) == 2
    finally:
        serving.cancel()
        await aggregator.stop()


async def test_the_aggregate_does_not_follow_its_own_grid_battery_nor_recompute_for_excluded_services(
        busctl: Busctl, tmp_path: Path) -> None:
    """A grid battery signals at each change of its meter; it is never a member of the aggregate next to it, so
    the aggregate does not follow it (the grid battery follows its meter on the aggregate's connection to the
    members). An excluded service is followed but its changes make the aggregate compute nothing."""
    from aggregator.bus.service import VeService
    from aggregator.host.daemon import Host, first_config

    grid, meter_name = "com.victronenergy.battery.gridown", "com.victronenergy.grid.ownmeter"
    excluded = "com.victronenergy.battery.ownexcluded"
    meter = VeService(await connect(), meter_name)
    other = VeService(await connect(), excluded)
    for instance, service in enumerate((meter, other), start=71):
        service.add_mandatory_paths(process_name="test", process_version="1", connection="test",
                                    device_instance=instance, product_id=0xB0F0, product_name="test")
    for path, start in (("/Ac/Energy/Forward", 100.0), ("/Ac/Energy/Reverse", 50.0), ("/Ac/Power", 300.0)):
        meter.add_path(path, start)
    await meter.register()
    other.add_path("/Soc", 50.0)
    other.add_path("/Dc/0/Voltage", 52.0)
    await other.register()
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({
        "serviceName": "com.victronenergy.battery.aggown", "stateDir": str(tmp_path / "state"),
        "startupBatteryWait": 1, "excludedServices": [excluded],
        "gridBatteries": [{"meter": meter_name, "startDate": "2023-01-01", "serviceName": grid}]}))
    level = logging.getLogger().level  # the config's is set next; the tests after this one expect theirs
    config = first_config(str(config_path), None)
    assert config is not None
    host = Host(str(config_path), os.environ["DBUS_SESSION_BUS_ADDRESS"])
    assert await host.start(config)
    aggregator = host.aggregator
    assert aggregator is not None and aggregator.monitor is not None
    monitor = aggregator.monitor
    try:
        await on_bus(busctl, grid)
        await eventually(lambda: excluded in monitor.services)
        changes: dict[str, int] = {}
        flushes: dict[str, int] = {}
        inside: list[str] = []
        on_changed, schedule = monitor.on_changed, aggregator._schedule_flush
        assert on_changed is not None

        def followed(service: Any, values: dict[str, Any]) -> None:
            changes[service.name] = changes.get(service.name, 0) + 1
            inside.append(service.name)
            try:
                on_changed(service, values)
            finally:
                inside.pop()

        def scheduled() -> None:
            if inside:
                flushes[inside[-1]] = flushes.get(inside[-1], 0) + 1
            schedule()

        monitor.on_changed = followed
        aggregator._schedule_flush = scheduled  # type: ignore[method-assign]
        for step in range(1, 6):
            meter["/Ac/Power"] = 300.0 + step
            other["/Soc"] = 50.0 + step
        grid_battery = next(f for f in aggregator.features if f.name == "grid_battery")
        running = grid_battery.running[0]  # type: ignore[attr-defined]
        assert running.monitor.bus is monitor.bus  # its meter is read with the members, in the same wake-ups
        await meter_barrier(running, meter_name)
        # Calls on the aggregate's connection: answered after the signals each service sent before.
        await client.get_value(monitor.bus, grid, "/Dc/0/Power")
        await client.get_value(monitor.bus, excluded, "/Soc")
        assert changes.get(excluded, 0) >= 1 and monitor.services[excluded].values["/Soc"] == 55.0
        assert grid not in monitor.services and changes.get(grid, 0) == 0, changes
        assert flushes == {}, flushes
    finally:
        await aggregator.stop()
        meter.close()
        other.close()
        logging.getLogger().setLevel(level)
