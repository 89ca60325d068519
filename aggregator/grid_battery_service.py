"""The grid battery on D-Bus: follows a grid meter, feeds grid_battery.py, publishes a battery service.

`GridBatteryService` takes a connection of its own (it publishes `serviceName` on it and closes it on
stop), finds the meter among the `com.victronenergy.grid.*` services with a ServiceMonitor, takes its dates
(start date, reset day, daily rows) in the user's time zone from localsettings, and keeps its
state in `<state_dir>/grid_battery.json` (saved atomically every `save_interval` seconds and on stop, so a
kill -9 loses at most that much; the meter's counters cover the time the service was away).

    python -m aggregator.grid_battery_service --config JSON_OR_FILE --state-dir DIR
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import signal
import sys
import time
from dataclasses import replace
from datetime import date, tzinfo
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import __version__
from .battery_paths import text_format
from .bus.lib import MessageBus, connect
from .bus.monitor import ServiceMonitor, WatchedService
from .bus.service import VeService
from .energy import local_date
from .grid_battery import GridBattery, GridBatteryConfig, HistoryRow, history_rows_csv, parse_month_day
from .local_time import TimeZoneFollower, zone_named
from .state import StateStore
from .validation import format_validation_error

_LOG = logging.getLogger(__name__)

GRID_PREFIX = "com.victronenergy.grid."
STATE_FILE = "grid_battery.json"
GRID_BATTERY_PRODUCT_ID = 0xB0F3  # ours, next to the simulator's and the aggregate's
GRID_BATTERY_PRODUCT_NAME = "Grid battery"
DEFAULT_SAVE_INTERVAL = 180.0
METER_PATHS = ("/Ac/Energy/Forward", "/Ac/Energy/Reverse", "/Ac/Power")
STATUS_OK = "ok"

Clock = Callable[[], float]


# ---- settings ------------------------------------------------------------------------------------------

class GridBatterySettingsError(ValueError):
    """The settings cannot be used; the message names the key, the value and what is allowed."""


class GridBatterySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    meter: str | int = Field(..., description="the grid meter: a com.victronenergy.grid.* service name, "
                             "name:<CustomName or ProductName>, or its device instance")
    capacityKwh: float = Field(0.0, ge=0, lt=1e6, description="kWh the grid battery holds; 0 = unlimited")
    startDate: date = Field(..., description="the day counting starts (YYYY-MM-DD)")
    resetDate: str | None = Field(None, description="MM-DD: every year on that day the level returns to 0; "
                                  "null = never")
    serviceName: str = Field("com.victronenergy.battery.grid", pattern=r"^com\.victronenergy\.battery\.[A-Za-z0-9_]+$",
                             description="D-Bus name of the grid battery")
    nominalVoltage: float = Field(51.2, gt=0, le=1000, description="V for the Ah values and the current")
    deviceInstance: int = Field(100, ge=0, le=65535, description="the battery's device instance")
    maxPowerKw: float = Field(100.0, gt=0, le=100000, description="the grid connection's largest power: meter "
                              "counters moving faster are rejected as impossible")

    @field_validator("meter")
    @classmethod
    def _meter(cls, value: str | int) -> str | int:
        if isinstance(value, int):
            if value < 0:
                raise ValueError("a device instance must be >= 0")
            return value
        text = value.strip()
        if text.isdigit():
            return int(text)
        if text.startswith(GRID_PREFIX) and len(text) > len(GRID_PREFIX):
            return text
        if text.startswith("name:") and text[5:].strip():
            return text
        raise ValueError(f"{value!r} is not a meter reference; allowed: a {GRID_PREFIX}* service name, "
                         f"name:<CustomName or ProductName>, or a device instance number")

    @field_validator("resetDate")
    @classmethod
    def _reset_date(cls, value: str | None) -> str | None:
        if value is not None:
            parse_month_day(value)
        return value

    def battery_config(self) -> GridBatteryConfig:
        return GridBatteryConfig(
            capacity_kwh=self.capacityKwh, start_date=self.startDate,
            reset_day=parse_month_day(self.resetDate) if self.resetDate else None,
            nominal_voltage=self.nominalVoltage, max_power_kw=self.maxPowerKw,
        )


def parse_settings(data: Any, source: str = "grid battery settings") -> GridBatterySettings:
    try:
        return GridBatterySettings.model_validate(data)
    except ValidationError as err:
        raise GridBatterySettingsError(format_validation_error(err, source)) from None


# ---- the meter -------------------------------------------------------------------------------------------

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


ReserveInstance = Callable[[str, int], Awaitable[int]]
# Adds a writeable /CustomName kept in localsettings to a service; returns what ends that.
BindName = Callable[[VeService], Awaitable[Callable[[], None]]]


class GridBatteryService:
    def __init__(self, bus: MessageBus, settings: GridBatterySettings, state_dir: str | Path,
                 clock: Clock = time.time, *, save_interval: float = DEFAULT_SAVE_INTERVAL,
                 reserve_instance: ReserveInstance | None = None, bind_name: BindName | None = None) -> None:
        """`reserve_instance(service name, preferred)`: the device instance as localsettings assigns it (so
        the GX's device list resolves collisions); without it, the configured deviceInstance. `bind_name`
        keeps the /CustomName in localsettings; without it, the name lasts until the process ends."""
        self.bus = bus
        self.reserve_instance = reserve_instance
        self.bind_name = bind_name
        self._unbind_name: Callable[[], None] | None = None
        self.settings = settings
        self.clock = clock
        self.save_interval = save_interval
        self.store = StateStore(Path(state_dir) / STATE_FILE)
        self.battery = GridBattery(settings.battery_config())
        self.meter: WatchedService | None = None
        self.meter_name: str | None = None  # the meter the counter anchors belong to
        self.service: VeService | None = None
        self.monitor: ServiceMonitor | None = None
        self._grid_power: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.zone: TimeZoneFollower | None = None
        self.zone_name: str | None = None  # the user's zone in use (saved: the CSV export shows its times)

    # ---- life cycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._load()
        service = VeService(self.bus, self.settings.serviceName)
        instance = self.settings.deviceInstance
        if self.reserve_instance is not None:
            instance = await self.reserve_instance(self.settings.serviceName, instance)
        service.add_mandatory_paths(
            process_name="battery-aggregator grid-battery", process_version=__version__,
            connection=f"Grid meter {self.settings.meter}", device_instance=instance,
            product_id=GRID_BATTERY_PRODUCT_ID, product_name=GRID_BATTERY_PRODUCT_NAME,
        )
        if self.bind_name is not None:
            self._unbind_name = await self.bind_name(service)
        else:
            service.add_path("/CustomName", "", writeable=True, value_types=(str,))
        for path in ("/Soc", "/Capacity", "/InstalledCapacity", "/Dc/0/Power", "/Dc/0/Voltage", "/Dc/0/Current",
                     "/History/ChargedEnergy", "/History/DischargedEnergy"):
            service.add_path(path, None, text=text_format(path))
        for path in ("/GridBattery/LevelKwh", "/GridBattery/LostExportKwh", "/GridBattery/ImportBeyondKwh"):
            service.add_path(path, None, text="{:.2f}kWh")
        service.add_path("/GridBattery/Meter", None)
        service.add_path("/GridBattery/Status", "starting")
        self.service = service
        self.zone = TimeZoneFollower(self.bus, self._set_zone)
        await self.zone.start()  # before the meter: its first sample is dated in the user's zone
        self._publish()
        self.monitor = ServiceMonitor(self.bus, [GRID_PREFIX], on_added=self._on_added,
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
        for message in self.battery.update(self.clock(), meter.values.get("/Ac/Energy/Forward"),
                                           meter.values.get("/Ac/Energy/Reverse")):
            _LOG.warning("%s", message)
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
            "/GridBattery/Status": self.status(),
        })


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
    service = GridBatteryService(bus, settings, state_dir, clock, save_interval=save_interval)
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
