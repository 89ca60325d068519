"""The dispatcher on the bus: adapters in, the pure controller in the middle, setpoints and status out.

Every `cycleSeconds`: read every battery's adapters -> BatteryReading -> Dispatcher.step(now, target,
readings) -> write the setpoints that changed -> publish /Dispatcher/* on the VeService (and the same on MQTT
state topics). The target is written to /Dispatcher/TargetPower (W, + charge / - discharge) or to the MQTT
command topic, or follows the grid meter in gridZero mode. /Dispatcher/Enabled 0 sends every setpoint 0 once
and then leaves the batteries alone.

Run alone (tests, trials): `python -m aggregator.dispatch.runtime --config FILE.json` publishes
`org.batteryaggregator.dispatcher` (or the section's serviceName).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ... import __version__
from ...bounded import bounded_repr
from ...bus.beats import beat
from ...bus.lib import MessageBus, connect
from ...bus.service import VeService
from ...mqtt import hass
from ...mqtt.link import MqttLink
from .adapters import (DbusReadings, MqttSetpoint, Reading, Setpoint, as_number, dispatcher_link, make_reading,
                       make_setpoint)
from .core.controller import BatteryReading, DispatchResult, Dispatcher, grid_zero_target
from .settings import BatterySettings, DispatcherConfig, dispatcher_settings
from .topics import DispatcherTopics

_LOG = logging.getLogger("aggregator.dispatch.runtime")

PREFIX = "/Dispatcher"
GRID_POWER_PATH = "/Ac/Power"

SaveState = Callable[[dict[str, Any]], None]


@dataclass(slots=True)
class BatteryIO:
    """One battery's adapters. Limits are a number from the config or a reading."""

    settings: BatterySettings
    setpoint: Setpoint
    measured: Reading
    soc: Reading | None = None
    temperature: Reading | None = None
    capacity: Reading | float | None = None
    max_charge: Reading | float = 0.0
    max_discharge: Reading | float = 0.0
    # The highest limits read so far: what TargetPower is checked against when a limit comes from the device.
    seen_charge_w: float = 0.0
    seen_discharge_w: float = 0.0
    write_task: asyncio.Task[bool] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.settings.name

    def reading(self, now: float) -> BatteryReading:
        charge = _value(self.max_charge)
        discharge = _value(self.max_discharge)
        self.seen_charge_w = max(self.seen_charge_w, charge or 0.0)
        self.seen_discharge_w = max(self.seen_discharge_w, discharge or 0.0)
        soc = self.soc.value if self.soc is not None else None
        temperature = self.temperature.value if self.temperature is not None else None
        return BatteryReading(
            name=self.name,
            measured_w=self.measured.value,
            measured_age_s=self.measured.age(now),
            soc=soc if soc is not None and 0.0 <= soc <= 100.0 else None,
            capacity_wh=_value(self.capacity),
            max_charge_w=max(0.0, charge or 0.0),  # an unknown limit allows nothing in that direction
            max_discharge_w=max(0.0, discharge or 0.0),
            available=self.measured.value is not None and self.setpoint.reachable,
            temperature_c=temperature if temperature is not None and -60.0 <= temperature <= 120.0 else None,
        )

    def rated_w(self) -> tuple[float, float]:
        """(charge, discharge) limits as configured, or the highest the device has reported."""
        charge = self.max_charge if isinstance(self.max_charge, float) else self.seen_charge_w
        discharge = self.max_discharge if isinstance(self.max_discharge, float) else self.seen_discharge_w
        return charge, discharge


def _value(source: Reading | float | None) -> float | None:
    if source is None or isinstance(source, float):
        return source
    return source.value


class DispatcherRuntime:
    """The dispatcher's cycle on a VeService. Construct before `service.register()` (it adds its paths), then
    `await start()`; `await stop()` writes every setpoint 0 and saves the learned state."""

    def __init__(self, config: DispatcherConfig, service: VeService, *, bus: MessageBus | None = None,
                 prefix: str = PREFIX, clock: Callable[[], float] = time.monotonic,
                 save_state: SaveState | None = None, restore_state: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self.service = service
        self.bus = bus if bus is not None else service.bus
        self.prefix = prefix
        self.clock = clock
        self.save_state = save_state
        self.enabled = config.enabled
        self.target_w = 0.0  # the target as written; in gridZero mode computed every cycle
        self.status = "starting"
        self.last_result: DispatchResult | None = None
        self.cycles = 0
        self.dispatcher = Dispatcher(dispatcher_settings(config), [b.name for b in config.batteries])
        if restore_state:
            try:
                self.dispatcher.restore(dict(restore_state))
            except Exception:
                _LOG.exception("the saved dispatcher state could not be restored; starting to learn afresh")

        self.dbus = DbusReadings(self.bus, refresh_s=config.readRefreshS, timeout=min(2.0, config.staleAfterS),
                                 clock=clock)
        self.topics: hass.Topics | None = None
        self.mqtt: MqttLink | None = None
        self.on_mqtt: DispatcherTopics | None = None
        if config.mqtt is not None:
            self.topics = hass.Topics(config.mqtt.topicPrefix)
            self.mqtt = dispatcher_link(config.mqtt, self.topics.availability, clock)
            self.on_mqtt = DispatcherTopics(self, self.mqtt, self.topics)
        self.batteries = [self._build(b) for b in config.batteries]
        self.grid: Reading | None = None
        if config.mode == "gridZero":
            assert config.gridMeter is not None
            self.grid = self.dbus.reading("grid meter", config.gridMeter, GRID_POWER_PATH)

        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._last_save = clock()
        self._add_paths()
        if self.on_mqtt is not None:
            self.on_mqtt.wire()

    # ---- building ------------------------------------------------------------------------------------------

    def _build(self, b: BatterySettings) -> BatteryIO:
        label = f"battery {b.name!r}"
        keepalive = self.config.setpointKeepAliveS
        if b.setpointTimeoutS is not None:
            # The device's watchdog: a heartbeat well inside it, so only our death lets it expire.
            heartbeat = b.setpointTimeoutS / 3.0
            keepalive = heartbeat if keepalive <= 0 else min(keepalive, heartbeat)
        io = BatteryIO(
            settings=b,
            setpoint=make_setpoint(f"{label} setpoint", b.setpoint, self.bus, self.mqtt, sign=b.setpointSign,
                                   min_command_w=b.minCommandW, keepalive_s=keepalive),
            measured=make_reading(f"{label} measured", b.measured, self.dbus, self.mqtt, sign=b.measuredSign),
        )
        if isinstance(io.setpoint, MqttSetpoint) and b.zeroWill and self.mqtt is not None:
            self.mqtt.add_will(io.setpoint.topic, io.setpoint.payload(0.0), io.setpoint.forget)
        if b.soc is not None:
            io.soc = make_reading(f"{label} soc", b.soc, self.dbus, self.mqtt)
        if b.temperature is not None:
            io.temperature = make_reading(f"{label} temperature", b.temperature, self.dbus, self.mqtt)
        if b.capacity is not None:
            io.capacity = make_reading(f"{label} capacity", b.capacity, self.dbus, self.mqtt)
        elif b.capacityWh is not None:
            io.capacity = float(b.capacityWh)
        for attr, spec in (("max_charge", b.maxChargeW), ("max_discharge", b.maxDischargeW)):
            if isinstance(spec, (int, float)):
                setattr(io, attr, float(spec))
            else:
                setattr(io, attr, make_reading(f"{label} {attr}", spec, self.dbus, self.mqtt))
        return io

    def _add_paths(self) -> None:
        p, s = self.prefix, self.service
        s.add_path(f"{p}/TargetPower", self.target_w, writeable=True, value_types=(int, float), text="{:.0f}W",
                   on_change=self._on_target_write,
                   description="total power target in W, + charge / - discharge, within the fleet's limits")
        s.add_path(f"{p}/Enabled", int(self.enabled), writeable=True, value_types=(int,),
                   on_change=self._on_enabled_write, description="1: command the batteries; 0: every setpoint 0")
        s.add_path(f"{p}/Mode", self.config.mode)
        s.add_path(f"{p}/Status", self.status)
        for name in ("AchievedPower", "PredictedPower", "Correction"):
            s.add_path(f"{p}/{name}", None, text="{:.0f}W")
        s.add_path(f"{p}/Saturated", 0)
        s.add_path(f"{p}/Soc", None, text="{:.1f}%")
        s.add_path(f"{p}/MinTargetPower", None, text="{:.0f}W")
        s.add_path(f"{p}/MaxTargetPower", None, text="{:.0f}W")
        for i, b in enumerate(self.batteries):
            q = f"{p}/Batteries/{i}"
            s.add_path(f"{q}/Name", b.name)
            for name in ("Setpoint", "Measured", "ChargeLimit", "DischargeLimit"):
                s.add_path(f"{q}/{name}", None, text="{:.0f}W")
            s.add_path(f"{q}/Gain", None, text="{:.3f}")
            s.add_path(f"{q}/Soc", None, text="{:.1f}%")
            s.add_path(f"{q}/Status", "starting")

    # ---- life cycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.dbus.start()
        if self.mqtt is not None:
            self.mqtt.start()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, *, zero_setpoints: bool = True) -> None:
        """Stop cycling; write every setpoint 0 (best effort) so no battery keeps a command nobody follows."""
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if zero_setpoints and self.enabled:
            await self._zero_all()
        self._save(force=True)
        for task in self._side_tasks:
            task.cancel()
        if self.on_mqtt is not None:
            self.on_mqtt.cancel()
        if self.mqtt is not None:
            await self.mqtt.stop()
        await self.dbus.stop()

    async def _run(self) -> None:
        period = self.config.cycleSeconds
        while True:
            try:
                await self.cycle()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one cycle must not stop the dispatcher
                _LOG.exception("dispatch cycle failed")
            # The next beat of the period (with the service's tick: one wake-up); a cycle that overran its
            # period waits for the next one rather than bursting to catch up.
            await beat(period)

    # ---- one cycle -------------------------------------------------------------------------------------------

    async def cycle(self) -> DispatchResult | None:
        now = self.clock()
        self.dbus.refresh()
        readings = {b.name: b.reading(now) for b in self.batteries}
        result: DispatchResult | None = None
        if self.enabled:
            target, note = self._effective_target(readings, now)
            result = self.dispatcher.step(now, target, readings)
            self.status = f"{result.status}; {note}" if note else result.status
            await self._write(result, now)
        else:
            self.status = "disabled"
        self.last_result = result
        self.cycles += 1
        self._publish(result, readings, now)
        self._save()
        return result

    def _effective_target(self, readings: Mapping[str, BatteryReading], now: float) -> tuple[float, str]:
        if self.config.mode != "gridZero":
            return self.target_w, ""
        assert self.grid is not None
        grid = self.grid.value
        # (not a battery held for a frozen or inverted meter: what it reports is not what it does)
        current = self.dispatcher.usable_total(readings)
        if grid is None or self.grid.age(now) > self.config.staleAfterS:
            # Without the grid meter there is nothing to regulate against: stop, rather than guess.
            self.target_w = 0.0
            return 0.0, "grid meter unavailable"
        self.target_w = grid_zero_target(grid, current, self.config.gridSetpointW, self.config.gridDeadbandW)
        return self.target_w, ""

    async def _write(self, result: DispatchResult, now: float) -> None:
        """Start the writes that are due; wait for them at most most of a cycle (a hung device must not stall the
        others: its write goes on in the background and the next one waits for it)."""
        started: list[asyncio.Task[bool]] = []
        for b in self.batteries:
            command = result.commands.get(b.name)
            if command is None or (b.write_task is not None and not b.write_task.done()) \
                    or not b.setpoint.due(command.setpoint_w, now):
                continue  # no task for a write that would send nothing: most cycles change no setpoint
            b.write_task = asyncio.get_running_loop().create_task(b.setpoint.write(command.setpoint_w, now))
            started.append(b.write_task)
        if started:
            await asyncio.wait(started, timeout=max(0.2, 0.8 * self.config.cycleSeconds))

    async def _zero_all(self) -> None:
        """Every setpoint 0, forced (even when 0 was the last value written), after the writes in flight."""
        zeros = self.dispatcher.disable() or {b.name: 0.0 for b in self.batteries}
        pending = [b.write_task for b in self.batteries if b.write_task is not None and not b.write_task.done()]
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        now = self.clock()
        writes = [b.setpoint.write(zeros.get(b.name, 0.0), now, force=True) for b in self.batteries]
        results = await asyncio.gather(*writes, return_exceptions=True)
        failed = [b.name for b, ok in zip(self.batteries, results) if ok is not True]
        if failed:
            _LOG.warning("setpoint 0 not confirmed by: %s", ", ".join(failed))

    # ---- commands from D-Bus and MQTT --------------------------------------------------------------------------

    def fleet_range(self) -> tuple[float, float]:
        """(lowest, highest) target: the fleet's discharge and charge limits."""
        charge = sum(b.rated_w()[0] for b in self.batteries)
        discharge = sum(b.rated_w()[1] for b in self.batteries)
        return -discharge, charge

    def target_refusal(self, value: Any) -> str | None:
        """Why a new target is refused, or None when it is fine."""
        if self.config.mode == "gridZero":
            return "the target follows the grid meter (mode gridZero)"
        number = as_number(value)
        if number is None:
            return f"{bounded_repr(value)} is not a finite number of watts"
        low, high = self.fleet_range()
        if not low - 1e-6 <= number <= high + 1e-6:
            return f"{number:g} W is outside the fleet's limits {low:g}..{high:g} W"
        return None

    def set_target(self, value: Any) -> bool:
        why = self.target_refusal(value)
        if why is not None:
            _LOG.warning("target refused: %s", why)
            return False
        self.target_w = float(value)
        return True

    def _on_target_write(self, _path: str, value: Any) -> bool:
        return self.set_target(value)

    def _on_enabled_write(self, _path: str, value: Any) -> bool:
        if value not in (0, 1) or isinstance(value, bool):
            return False
        self.set_enabled(bool(value))
        return True

    def set_enabled(self, enabled: bool) -> None:
        if enabled == self.enabled:
            return
        self.enabled = enabled
        _LOG.info("dispatching %s", "enabled" if enabled else "disabled: every setpoint 0")
        if not enabled:
            self.spawn(self._zero_all())

    # ---- publishing ----------------------------------------------------------------------------------------------

    def _publish(self, result: DispatchResult | None, readings: Mapping[str, BatteryReading], now: float) -> None:
        stale = self.config.staleAfterS
        fresh = [r for r in readings.values() if _fresh(r, stale)]
        achieved = sum(r.measured_w for r in fresh) if fresh else None  # type: ignore[misc]
        soc = _combined_soc(readings.values())
        low, high = self.fleet_range()
        p = self.prefix
        values: dict[str, Any] = {
            f"{p}/TargetPower": round(self.target_w, 1),
            f"{p}/Enabled": int(self.enabled),
            f"{p}/Status": self.status,
            f"{p}/AchievedPower": _round(achieved),
            f"{p}/PredictedPower": _round(result.predicted_total_w) if result else None,
            f"{p}/Correction": _round(result.correction_w) if result else None,
            f"{p}/Saturated": int(bool(result and result.saturated)),
            f"{p}/Soc": _round(soc, 1),
            f"{p}/MinTargetPower": round(low, 1),
            f"{p}/MaxTargetPower": round(high, 1),
        }
        rows: dict[str, dict[str, Any]] = {}
        for i, b in enumerate(self.batteries):
            r = readings[b.name]
            c = result.commands.get(b.name) if result else None
            status = c.status if c else ("stale" if r.measured_w is not None and not _fresh(r, stale)
                                         else "unavailable" if not r.available else "disabled")
            row = {
                "Setpoint": _round(c.setpoint_w) if c else 0.0,
                "Measured": _round(r.measured_w),
                "Gain": _round(c.gain, 3) if c else _round(self.dispatcher.model(b.name).gain, 3),
                "ChargeLimit": _round(c.charge_limit_w) if c else None,
                "DischargeLimit": _round(c.discharge_limit_w) if c else None,
                "Soc": _round(r.soc, 1),
                "Status": status,
            }
            rows[b.name] = row
            for key, value in row.items():
                values[f"{p}/Batteries/{i}/{key}"] = value
        self.service.set_values(values)
        if self.on_mqtt is not None and self.on_mqtt.link.connected.is_set():
            capacity, remaining = fleet_energy_kwh(readings)
            self.on_mqtt.publish(values, rows, {"achieved_power": achieved, "soc": _round(soc, 1),
                                                "capacity": _round(capacity, 2),
                                                "remaining_energy": _round(remaining, 2)})

    # ---- state ----------------------------------------------------------------------------------------------------

    def _save(self, force: bool = False) -> None:
        if self.save_state is None:
            return
        now = self.clock()
        if not force and now - self._last_save < self.config.stateSaveS:
            return
        self._last_save = now
        try:
            self.save_state(self.dispatcher.state())
        except Exception:
            _LOG.exception("saving the dispatcher state failed")

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)


def _fresh(r: BatteryReading, stale_after_s: float) -> bool:
    return r.available and r.measured_w is not None and r.measured_age_s <= stale_after_s


def _combined_soc(readings: Any) -> float | None:
    """Capacity-weighted SoC (equal weights when no battery knows its capacity)."""
    with_soc = [r for r in readings if r.soc is not None]
    if not with_soc:
        return None
    weighted = [(r.soc, r.capacity_wh) for r in with_soc if r.capacity_wh]
    if weighted:
        total = sum(c for _, c in weighted)
        return sum(s * c for s, c in weighted) / total
    return sum(r.soc for r in with_soc) / len(with_soc)


def fleet_energy_kwh(readings: Mapping[str, BatteryReading]) -> tuple[float | None, float | None]:
    """(combined capacity, energy stored now) in kWh over the batteries that know their capacity. The stored
    energy is unknown while one of them does not report its SoC (a sum without it would look like a loss)."""
    sized = [r for r in readings.values() if r.capacity_wh is not None and r.capacity_wh > 0]
    if not sized:
        return None, None
    capacity = sum(r.capacity_wh for r in sized) / 1000.0  # type: ignore[misc]
    if any(r.soc is None for r in sized):
        return capacity, None
    return capacity, sum(r.soc * r.capacity_wh for r in sized) / 100.0 / 1000.0  # type: ignore[operator]


def _round(value: float | None, digits: int = 1) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


# ---- running alone ------------------------------------------------------------------------------------------

async def run_alone(config: DispatcherConfig, stop: asyncio.Event, *, state_file: str | None = None,
                    bus_address: str | None = None) -> None:
    from ...state import StateStore

    store = StateStore(state_file) if state_file else None
    bus = await connect(bus_address)
    service = VeService(bus, config.serviceName)
    service.add_path("/Mgmt/ProcessName", "battery-aggregator dispatcher")
    service.add_path("/Mgmt/ProcessVersion", __version__)
    service.add_path("/Mgmt/Connection", "local")
    runtime = DispatcherRuntime(config, service, save_state=store.save if store else None,
                                restore_state=store.load() if store else None)
    await service.register()
    await runtime.start()
    _LOG.info("dispatcher running: %d batteries, mode %s, %s", len(runtime.batteries), config.mode,
              "enabled" if runtime.enabled else "disabled")
    try:
        await stop.wait()
    finally:
        await runtime.stop()
        service.close()


def main(argv: list[str] | None = None) -> int:
    import sys

    from ...validation import JsonFileError, read_json
    from .settings import DispatcherConfigError, parse_dispatcher_config

    parser = argparse.ArgumentParser(prog="python -m aggregator.dispatch.runtime",
                                     description="The power dispatcher on its own D-Bus service.")
    parser.add_argument("--config", required=True, help="JSON file: the dispatcher section, or a config.json "
                        "with a 'dispatcher' key")
    parser.add_argument("--state", help="file for the learned state (kept across restarts)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = parse_dispatcher_config(read_json(args.config), f"dispatcher config {args.config}")
    except (JsonFileError, DispatcherConfigError) as exc:
        print(exc, file=sys.stderr)
        return 1

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_alone(config, stop, state_file=args.state)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
