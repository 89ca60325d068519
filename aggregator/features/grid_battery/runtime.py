"""The grid battery on D-Bus: follows a grid meter, feeds grid_battery.py, publishes a battery service.

`GridBatteryService` takes a connection of its own (it publishes `serviceName` on it and closes it on
stop), finds the meter among the `com.victronenergy.grid.*` services with a ServiceMonitor, takes its dates
(start date, reset day, daily rows) in the user's time zone from localsettings, and keeps its
state in `<state_dir>/grid_battery.json`: saved atomically on the first sample (the counter anchors a restart
counts from), at each new day, every `save_interval` seconds and on stop, so a kill -9 loses nothing the
meter's counters do not cover. The 15-minute load profile goes to `<state_dir>/load_profile.csv` (bounded).

    python -m aggregator.features.grid_battery.runtime --config JSON_OR_FILE --state-dir DIR
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import replace
from datetime import date, datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ... import __version__
from ...battery.paths import text_format
from ...battery.publish import bind_custom_name, preferred_instance, unique_id
from ...bus.lib import MessageBus, connect
from ...bus.monitor import ServiceMonitor, WatchedService
from ...bus.service import VeService
from ...bus.settings import SETTINGS_SERVICE, LocalSettings
from ...bus.watch import PathWatcher
from .core import (GRID_BATTERY_PRODUCT_ID, GRID_PREFIX, PROFILE_HEADER, GridBattery, HistoryRow, ProfileSlot,
                   history_rows_csv, profile_csv_line)
from ...local_time import TIME_ZONE_PATH, TimeZoneSetting, local_date, zone_named
from ...state import StateStore

if TYPE_CHECKING:
    from .settings import GridBatterySettings

_LOG = logging.getLogger("aggregator.grid_battery_service")

STATE_FILE = "grid_battery.json"
PROFILE_FILE = "load_profile.csv"
PROFILE_MAX_BYTES = 1 << 20  # some 250 days of 15-minute rows; one older file of that size is kept besides
GRID_BATTERY_PRODUCT_NAME = "Grid battery"
DEFAULT_SAVE_INTERVAL = 180.0
METER_PATHS = ("/Ac/Energy/Forward", "/Ac/Energy/Reverse", "/Ac/Power")
STATUS_OK = "ok"

Clock = Callable[[], float]


def meter_matches(reference: str | int, service: WatchedService) -> bool:
    if isinstance(reference, int):
        return service.device_instance == reference
    if reference.startswith("name:"):
        wanted = reference[5:].strip()
        return wanted in (service.get("/CustomName"), service.get("/ProductName"))
    return service.name == reference


def resolve_meter(reference: str | int, services: Iterable[WatchedService]) -> WatchedService | None:
    """The meter a reference means; with several matches the lowest service name (the same on every run)."""
    matches = sorted((s for s in services if meter_matches(reference, s)), key=lambda s: s.name)
    return matches[0] if matches else None


# ---- the service -----------------------------------------------------------------------------------------

def _kwh(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class ProfileFile:
    """The load profile as CSV, appended to as slots finish: `<state dir>/load_profile.csv`, moved to
    `load_profile.csv.1` (replacing it) when it reaches `max_bytes`, so the two hold at most twice that. A slot
    not after the last one in the file is not written again (after a kill -9 the state may be older)."""

    def __init__(self, path: Path, max_bytes: int = PROFILE_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.last_start: float | None = None
        self._read_last = False

    def append(self, slots: Iterable[ProfileSlot], tz: tzinfo | None) -> None:
        try:
            self._append(list(slots), tz)
        except OSError as exc:
            _LOG.warning("load profile %s not written: %s", self.path, exc)

    def _append(self, slots: list[ProfileSlot], tz: tzinfo | None) -> None:
        if not self._read_last:
            self._read_last = True
            self.last_start = _last_start(self.path)
        lines = []
        for slot in slots:
            if self.last_start is None or slot.start > self.last_start:
                lines.append(profile_csv_line(slot, tz) + "\n")
                self.last_start = slot.start
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size >= self.max_bytes:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        new = not self.path.exists()
        with open(self.path, "a", encoding="utf-8") as out:
            out.write((PROFILE_HEADER + "\n" if new else "") + "".join(lines))


def _last_start(path: Path) -> float | None:
    """The start of the last slot in a profile file (epoch seconds); None when there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 512))
            tail = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(tail):
        try:
            return datetime.fromisoformat(line.split(",", 1)[0]).timestamp()
        except ValueError:
            continue
    return None


def profile_csv(state_dir: str | Path) -> str:
    """`battery-aggregator grid-battery --profile`: the 15-minute rows kept, oldest first."""
    rows: list[str] = []
    path = Path(state_dir) / PROFILE_FILE
    for part in (path.with_name(path.name + ".1"), path):
        try:
            rows += [line for line in part.read_text(encoding="utf-8").splitlines()[1:] if line]
        except OSError:
            continue
    return "\n".join([PROFILE_HEADER, *rows]) + "\n"


class TimeZoneFollower:
    """A TimeZoneSetting with a PathWatcher of its own, for a connection that watches nothing else."""

    def __init__(self, bus: MessageBus, on_zone: Callable[[tzinfo | None, str | None], None]) -> None:
        self.setting = TimeZoneSetting(on_zone)
        self._watcher = PathWatcher(bus, lambda _service, _path, value: self.setting.changed(value))
        self._watcher.watch(SETTINGS_SERVICE, TIME_ZONE_PATH)

    async def start(self) -> None:
        await self._watcher.start()

    async def stop(self) -> None:
        await self._watcher.stop()


class GridBatteryService:
    def __init__(self, bus: MessageBus, settings: GridBatterySettings, state_dir: str | Path,
                 clock: Clock = time.time, *, save_interval: float = DEFAULT_SAVE_INTERVAL,
                 local_settings: LocalSettings | None = None, meter_bus: MessageBus | None = None) -> None:
        """`local_settings`: localsettings' client, which assigns the device instance (so the GX's device list
        resolves collisions) and keeps /CustomName; without it, deviceInstance (or one derived from the
        name) and a /CustomName that is not kept. `meter_bus`: the connection the meter is followed on (default
        `bus`): in the service, the one that reads the members, so that the meter's signals are read in the
        same wake-ups as theirs."""
        self.bus = bus
        self.meter_bus = meter_bus or bus
        self.local_settings = local_settings
        self._unbind_name: Callable[[], None] | None = None
        self.settings = settings
        self.clock = clock
        self.save_interval = save_interval
        self.store = StateStore(Path(state_dir) / STATE_FILE)
        self.profile = ProfileFile(Path(state_dir) / PROFILE_FILE)
        self.battery = GridBattery(settings.battery_config())
        self.meter: WatchedService | None = None
        self.meter_name: str | None = None  # the meter the counter anchors belong to
        self.service: VeService | None = None
        self.monitor: ServiceMonitor | None = None
        self._grid_power: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.zone: TimeZoneFollower | None = None
        self.zone_name: str | None = None  # the user's zone in use (saved: the CSV export shows its times)
        self._saved_for: tuple[bool, date] | None = None  # (started, local day) at the last save

    # ---- life cycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._load()
        name = self.settings.serviceName
        service = VeService(self.bus, name)
        instance = self.settings.deviceInstance
        if instance is None:
            instance = preferred_instance(name)
        if self.local_settings is not None:
            instance = await self.local_settings.reserve_device_instance(unique_id(name), "battery", instance)
        service.add_mandatory_paths(
            process_name="battery-aggregator grid-battery", process_version=__version__,
            connection=f"Grid meter {self.settings.meter}", device_instance=instance,
            product_id=GRID_BATTERY_PRODUCT_ID, product_name=GRID_BATTERY_PRODUCT_NAME,
        )
        if self.local_settings is not None:  # kept in localsettings like the aggregate's own name
            self._unbind_name = await bind_custom_name(self.local_settings, service)
        else:
            service.add_path("/CustomName", "", writeable=True, value_types=(str,))
        for path in ("/Soc", "/Capacity", "/InstalledCapacity", "/Dc/0/Power", "/Dc/0/Voltage", "/Dc/0/Current",
                     "/History/ChargedEnergy", "/History/DischargedEnergy"):
            service.add_path(path, None, text=text_format(path))
        for path in ("/GridBattery/LevelKwh", "/GridBattery/LostExportKwh", "/GridBattery/ImportBeyondKwh"):
            service.add_path(path, None, text="{:.2f}kWh")
        service.add_path("/GridBattery/Meter", None)
        service.add_path("/GridBattery/Start", None)
        service.add_path("/GridBattery/Status", "starting")
        self.service = service
        self.zone = TimeZoneFollower(self.bus, self._set_zone)
        await self.zone.start()  # before the meter: its first sample is dated in the user's zone
        self._publish()
        self.monitor = ServiceMonitor(self.meter_bus, [GRID_PREFIX], on_added=self._on_added,
                                      on_removed=self._on_removed, on_changed=self._on_changed)
        await self.monitor.start()
        self._choose_meter()
        await service.register()
        self._spawn(self._save_periodically())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.save()
        if self.zone is not None:
            await self.zone.stop()
            self.zone = None
        if self.monitor is not None:
            await self.monitor.stop()
        if self._unbind_name is not None:
            self._unbind_name()
            self._unbind_name = None
        if self.service is not None:
            self.service.close()
            self.service = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- state -------------------------------------------------------------------------------------------

    def _load(self) -> None:
        data = self.store.load()
        battery, reason = GridBattery.from_dict(data.get("battery"), self.battery.config)
        if reason:
            _LOG.warning("%s", reason)
        self.battery = battery
        meter = data.get("meter")
        self.meter_name = meter if isinstance(meter, str) else None
        if data and not reason:
            _LOG.info("grid battery state loaded from %s: level %.2f kWh", self.store.path, battery.level_kwh)

    def save(self) -> None:
        self.store.save({"battery": self.battery.to_dict(), "meter": self.meter_name, "timeZone": self.zone_name})
        self._saved_for = self._milestone()

    def _milestone(self) -> tuple[bool, date]:
        return self.battery.started, local_date(self.clock(), self.battery.config.tz)

    def _set_zone(self, tz: tzinfo | None, name: str | None) -> None:
        """The user's time zone changed (or was read): reset day, start date and daily rows follow it."""
        self.battery.config = replace(self.battery.config, tz=tz)
        self.zone_name = name
        self._publish()

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.save_interval)
            self.save()

    # ---- the meter -------------------------------------------------------------------------------------

    def _on_added(self, _service: WatchedService) -> None:
        self._choose_meter()

    def _on_removed(self, service: WatchedService) -> None:
        if self.meter is not None and service.name == self.meter.name:
            self._choose_meter()

    def _on_changed(self, service: WatchedService, changes: dict[str, Any]) -> None:
        if self.meter is not None and service.name == self.meter.name:
            if any(path in changes for path in METER_PATHS):
                self._sample()
        elif "/CustomName" in changes or "/ProductName" in changes:
            self._choose_meter()  # a rename can make another service the meter

    def _choose_meter(self) -> None:
        services = self.monitor.services.values() if self.monitor is not None else ()
        meter = resolve_meter(self.settings.meter, services)
        if meter is not None and (self.meter is None or meter.name != self.meter.name):
            _LOG.info("grid meter: %s", meter.name)
            if self.meter_name is not None and meter.name != self.meter_name:
                # Another meter's counters have nothing to do with the old anchors.
                self.battery.forget_counters()
            self.meter_name = meter.name
        elif meter is None and self.meter is not None:
            _LOG.warning("grid meter %s left the bus", self.meter.name)
        self.meter = meter
        if meter is not None:
            self._sample()
        else:
            self._grid_power = None
            self._publish()

    def _sample(self) -> None:
        meter = self.meter
        assert meter is not None
        started = self.battery.started
        for message in self.battery.update(self.clock(), meter.values.get("/Ac/Energy/Forward"),
                                           meter.values.get("/Ac/Energy/Reverse")):
            _LOG.warning("%s", message)
        if self.battery.started and not started:
            log = _LOG.info if self.battery.exact else _LOG.warning
            log("grid battery %s counts from %s", self.settings.serviceName, self.battery.origin)
        slots = self.battery.take_closed_slots()
        if slots:
            self.profile.append(slots, self.battery.config.tz)
        # The first sample (the anchors a restart counts from) and each new day (yesterday's row is final)
        # are on disk at once, not only at the next periodic save.
        if self._milestone() != self._saved_for:
            self.save()
        power = meter.values.get("/Ac/Power")
        self._grid_power = float(power) if isinstance(power, (int, float)) and not isinstance(power, bool) \
            and math.isfinite(power) else None
        self._publish()

    # ---- publishing --------------------------------------------------------------------------------------

    def status(self) -> str:
        if self.meter is None:
            return f"meter missing: no {GRID_PREFIX}* service matches {self.settings.meter!r}"
        values = self.meter.values
        if values.get("/Ac/Energy/Forward") is None or values.get("/Ac/Energy/Reverse") is None:
            return f"meter {self.meter.name} has no valid /Ac/Energy/Forward and /Ac/Energy/Reverse"
        if self._grid_power is None:
            return f"meter {self.meter.name} has no valid /Ac/Power"
        today = local_date(self.clock(), self.battery.config.tz)
        if today < self.settings.startDate:
            return f"counting starts on {self.settings.startDate.isoformat()}"
        if not self.battery.exact:
            return f"started late: counting from {self.battery.origin}"
        return STATUS_OK

    def _publish(self) -> None:
        if self.service is None:
            return
        battery = self.battery
        voltage = self.settings.nominalVoltage
        power = battery.battery_power_w(self._grid_power) if self.meter is not None else None
        self.service.set_values({
            "/Soc": None if battery.soc is None else round(battery.soc, 2),
            "/Capacity": round(battery.level_ah, 2),
            "/InstalledCapacity": None if battery.installed_ah is None else round(battery.installed_ah, 2),
            "/Dc/0/Power": None if power is None else round(power, 1),
            "/Dc/0/Voltage": voltage,
            "/Dc/0/Current": None if power is None else round(power / voltage, 2),
            "/History/ChargedEnergy": _kwh(battery.charged_kwh),
            "/History/DischargedEnergy": _kwh(battery.discharged_kwh),
            "/GridBattery/LevelKwh": _kwh(battery.level_kwh),
            "/GridBattery/LostExportKwh": _kwh(battery.overflow_kwh),
            "/GridBattery/ImportBeyondKwh": _kwh(battery.beyond_kwh),
            "/GridBattery/Meter": self.meter.name if self.meter is not None else None,
            "/GridBattery/Start": battery.origin,
            "/GridBattery/Status": self.status(),
        })


def grid_state_dir(state_dir: str, settings: GridBatterySettings) -> str:
    """One directory per grid battery (its state file has a fixed name), named after its service."""
    return os.path.join(state_dir, "grid", settings.serviceName.rsplit(".", 1)[-1])


def history_csv(state_dir: str | Path) -> str:
    """`battery-aggregator grid-battery --csv`: the daily rows kept in the state (just the header when there
    is no usable state)."""
    data = StateStore(Path(state_dir) / STATE_FILE).load()
    rows: list[HistoryRow] = GridBattery.rows_from_dict(data.get("battery"))
    tz = zone_named(data["timeZone"])[0] if isinstance(data.get("timeZone"), str) else None
    return history_rows_csv(rows, tz)  # in the zone the service dated the rows in


# ---- as a process --------------------------------------------------------------------------------------

def scaled_clock(time_scale: float, origin: float, epoch: float | None = None) -> Clock:
    """A clock that starts at `epoch` (default `origin`) when the wall clock shows `origin`, and runs
    `time_scale` times faster: processes given the same three numbers agree, also across restarts."""
    start = origin if epoch is None else epoch
    return lambda: start + (time.time() - origin) * time_scale


def _read_config(text: str) -> Any:
    if text.lstrip().startswith("{"):
        return json.loads(text)
    return json.loads(Path(text).read_text(encoding="utf-8"))


async def _serve(settings: GridBatterySettings, state_dir: str, clock: Clock, save_interval: float) -> int:
    bus = await connect()
    local_settings = LocalSettings(bus)
    await local_settings.start()
    service = GridBatteryService(bus, settings, state_dir, clock, save_interval=save_interval,
                                 local_settings=local_settings)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopped = loop.create_task(stop.wait())
    disconnected = loop.create_task(bus.wait_for_disconnect())
    await asyncio.wait({stopped, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    if disconnected.done():
        service.save()
        _LOG.error("lost the D-Bus connection; exiting so the supervisor restarts us")
        stopped.cancel()
        return 2
    disconnected.cancel()
    await service.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The grid as a battery: publishes a battery service fed by a "
                                     "grid meter's energy counters.")
    parser.add_argument("--config", required=True, help="the settings as JSON text or a JSON file")
    parser.add_argument("--state-dir", required=True, help="where the state file is kept")
    parser.add_argument("--save-interval", type=float, default=DEFAULT_SAVE_INTERVAL, help="seconds between saves")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="simulations only: the clock runs this many times faster")
    parser.add_argument("--clock-origin", type=float, help="simulations only: wall-clock epoch the scaled clock "
                        "starts at (default now)")
    parser.add_argument("--clock-epoch", type=float, help="simulations only: what the scaled clock shows at "
                        "--clock-origin (default the origin)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    from .settings import parse_settings

    try:
        settings = parse_settings(_read_config(args.config), "grid battery config")
    except (OSError, ValueError) as exc:
        print(f"grid battery: {exc}", file=sys.stderr)
        return 1
    clock: Clock = time.time
    if args.time_scale != 1.0 or args.clock_epoch is not None:
        clock = scaled_clock(args.time_scale, args.clock_origin or time.time(), args.clock_epoch)
    return asyncio.run(_serve(settings, args.state_dir, clock, args.save_interval))


if __name__ == "__main__":
    raise SystemExit(main())
