"""A simulated grid meter: `com.victronenergy.grid.<name>` with a household's solar and load.

The profile (`HouseholdProfile`) and the meter's counters (`MeterModel`) are pure; `SimulatedGridMeter`
puts them on D-Bus. Simulated time runs `time_scale` times faster than the wall clock, so a year of
counters passes in seconds. Besides the paths of a real meter it has, for tests and demos:
  /Sim/Time            simulated epoch seconds
  /Sim/TimeScale       writeable: simulated seconds per second (0 pauses the meter)
  /Sim/ResetCounters   write 1: /Ac/Energy/Forward and /Ac/Energy/Reverse restart at 0 (a meter reset)

`--resolution 0.1` publishes the counters in 0.1 kWh steps, truncated, as many real meters do. `--forward` and
`--reverse` start the counters where a meter that has been running for years would be.

    python -m aggregator.simulator.grid_meter --name NAME --time-scale X [--start 2023-01-01] [--resolution KWH]
                                              [--forward KWH] [--reverse KWH]
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import time
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from aggregator import __version__
from aggregator.bus.lib import MessageBus, connect
from aggregator.bus.service import VeService

_LOG = logging.getLogger("aggregator.simulator.grid_meter")

GRID_PREFIX = "com.victronenergy.grid."
GRID_METER_PRODUCT_ID = 0xB0F2  # ours, like the simulated packs' 0xB0F0
MAX_STEP = 600.0  # simulated seconds per integration step: the daily curves are smooth at 10 minutes
_DAY = 86400.0
_YEAR_DAYS = 365.2425
_SUMMER_SOLSTICE_DOY = 172


def _gauss(x: float, centre: float, width: float) -> float:
    return math.exp(-0.5 * ((x - centre) / width) ** 2)


def _hash_unit(seed: int, slot: int) -> float:
    """A deterministic number in [0, 1) for (seed, slot): noise that is the same on every run."""
    x = (seed * 0x9E3779B97F4A7C15 + slot * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 29
    return (x & 0xFFFFFFFF) / 2**32


@dataclass(frozen=True, slots=True)
class HouseholdProfile:
    """Grid power of a house with solar panels: + = import, as a Victron grid meter reports it."""

    solar_peak_w: float = 5000.0  # clear summer noon
    winter_solar: float = 0.25  # winter noon as a fraction of summer noon
    base_load_w: float = 350.0
    morning_peak_w: float = 1200.0
    evening_peak_w: float = 1800.0
    noise: float = 0.15  # relative, per 15-minute slot (clouds, kettles)
    seed: int = 1

    def solar_w(self, hour: float, day_of_year: float) -> float:
        if not 6.0 <= hour <= 20.0:
            return 0.0
        season = 0.5 * (1 + math.cos(2 * math.pi * (day_of_year - _SUMMER_SOLSTICE_DOY) / _YEAR_DAYS))
        peak = self.solar_peak_w * (self.winter_solar + (1 - self.winter_solar) * season)
        return peak * _gauss(hour, 13.0, 2.5)

    def load_w(self, hour: float) -> float:
        return (self.base_load_w + self.morning_peak_w * _gauss(hour, 7.5, 1.0)
                + self.evening_peak_w * _gauss(hour, 19.0, 1.5))

    def grid_power_w(self, local_seconds: float) -> float:
        """Grid power at a local time given as seconds since 1970-01-01 00:00 local."""
        hour = (local_seconds % _DAY) / 3600.0
        day_of_year = (local_seconds / _DAY) % _YEAR_DAYS
        slot = int(local_seconds // 900)
        jitter = 1 + self.noise * (2 * _hash_unit(self.seed, slot) - 1)
        return self.load_w(hour) * jitter - self.solar_w(hour, day_of_year) * (2 - jitter)


@dataclass(slots=True)
class MeterModel:
    """The meter's counters, integrated over simulated time (kWh; forward = import, reverse = export)."""

    profile: HouseholdProfile
    sim_time: float  # epoch seconds
    utc_offset: float = 0.0  # seconds east of UTC of the simulated place
    forward_kwh: float = 0.0
    reverse_kwh: float = 0.0
    power_w: float = 0.0
    resolution_kwh: float = 0.0  # counters are shown in steps of this (truncated); 0 = to the Wh

    def __post_init__(self) -> None:
        self.power_w = self.profile.grid_power_w(self.sim_time + self.utc_offset)

    def advance(self, seconds: float) -> None:
        """Move simulated time on, integrating with the midpoint rule in steps of at most MAX_STEP."""
        remaining = max(0.0, seconds)
        while remaining > 0:
            step = min(MAX_STEP, remaining)
            power = self.profile.grid_power_w(self.sim_time + step / 2 + self.utc_offset)
            energy_kwh = power * step / 3.6e6
            if energy_kwh > 0:
                self.forward_kwh += energy_kwh
            else:
                self.reverse_kwh -= energy_kwh
            self.sim_time += step
            remaining -= step
        self.power_w = self.profile.grid_power_w(self.sim_time + self.utc_offset)

    def reset_counters(self) -> None:
        self.forward_kwh = 0.0
        self.reverse_kwh = 0.0

    def shown(self, kwh: float) -> float:
        """A counter as the meter displays it: truncated to its resolution (it never shows energy not yet in)."""
        if self.resolution_kwh <= 0:
            return round(kwh, 3)
        return round(math.floor(round(kwh / self.resolution_kwh, 9)) * self.resolution_kwh, 3)

    def values(self) -> dict[str, Any]:
        power = round(self.power_w, 1)
        forward, reverse = self.shown(self.forward_kwh), self.shown(self.reverse_kwh)
        return {
            "/Ac/Power": power, "/Ac/L1/Power": power,
            "/Ac/Energy/Forward": forward, "/Ac/Energy/Reverse": reverse,
            "/Ac/L1/Energy/Forward": forward, "/Ac/L1/Energy/Reverse": reverse,
            "/Sim/Time": round(self.sim_time, 1),
        }


class SimulatedGridMeter:
    """The model on D-Bus, ticking at `rate_hz`."""

    def __init__(self, name: str, model: MeterModel, *, time_scale: float = 1.0, rate_hz: float = 2.0,
                 device_instance: int = 30, bus_address: str | None = None) -> None:
        self.name = GRID_PREFIX + name
        self.model = model
        self.time_scale = time_scale
        self.rate_hz = rate_hz
        self.device_instance = device_instance
        self.bus_address = bus_address
        self.service: VeService | None = None
        self._last_tick = 0.0

    async def start(self) -> None:
        bus: MessageBus = await connect(self.bus_address)
        service = VeService(bus, self.name)
        service.add_mandatory_paths(
            process_name="battery-aggregator grid-meter simulator", process_version=__version__,
            connection="Simulated", device_instance=self.device_instance, product_id=GRID_METER_PRODUCT_ID,
            product_name="Simulated grid meter", firmware_version="sim-1.0", hardware_version="sim",
        )
        service.add_path("/CustomName", "", writeable=True, value_types=(str,))
        service.add_path("/Ac/NumberOfPhases", 1)
        for path, value in self.model.values().items():
            text = "{:.0f}W" if path.endswith("Power") else "{:.2f}kWh" if "Energy" in path else "{:.0f}s"
            service.add_path(path, value, text=text)
        service.add_path("/Sim/TimeScale", float(self.time_scale), writeable=True, value_types=(int, float),
                         on_change=self._on_time_scale, description="simulated seconds per second; 0 pauses")
        service.add_path("/Sim/ResetCounters", 0, writeable=True, value_types=(int,), on_change=self._on_reset,
                         description="write 1: the energy counters restart at 0")
        await service.register()
        self.service = service
        self._last_tick = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        period = 1.0 / self.rate_hz
        while not stop.is_set():
            self.tick()
            try:
                await asyncio.wait_for(stop.wait(), period)
            except asyncio.TimeoutError:
                pass

    def tick(self) -> None:
        now = time.monotonic()
        self.model.advance((now - self._last_tick) * self.time_scale)
        self._last_tick = now
        self._publish()

    def _publish(self) -> None:
        if self.service is not None:
            self.service.set_values(self.model.values())

    def _on_time_scale(self, _path: str, value: Any) -> bool:
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            return False
        self.tick()  # time so far runs at the old scale
        self.time_scale = float(value)
        return True

    def _on_reset(self, _path: str, value: Any) -> bool:
        if value != 1:
            return value == 0
        self.model.reset_counters()
        _LOG.info("%s: energy counters reset", self.name)
        self._publish()
        asyncio.get_running_loop().call_soon(self._rearm)
        return True

    def _rearm(self) -> None:
        if self.service is not None:
            self.service.set_value("/Sim/ResetCounters", 0)

    def close(self) -> None:
        if self.service is not None:
            self.service.close()
            self.service = None


def parse_start(text: str | None) -> float:
    """--start: epoch seconds, or a local ISO date/datetime ('2023-01-01', '2023-06-21T12:00'); None = now."""
    if text is None:
        return time.time()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return datetime.combine(date.fromisoformat(text), datetime.min.time()).timestamp()


def local_offset(epoch: float) -> float:
    return float(time.localtime(epoch).tm_gmtoff)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A simulated grid meter (com.victronenergy.grid.NAME).")
    parser.add_argument("--name", default="sim", help="service name suffix")
    parser.add_argument("--time-scale", type=float, default=1.0, help="simulated seconds per second")
    parser.add_argument("--rate", type=float, default=2.0, help="updates per second")
    parser.add_argument("--start", help="simulated start: epoch seconds or local ISO date/time (default now)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the load noise")
    parser.add_argument("--solar-peak", type=float, default=5000.0, help="W at a clear summer noon")
    parser.add_argument("--device-instance", type=int, default=30)
    parser.add_argument("--resolution", type=float, default=0.0, metavar="KWH",
                        help="publish the energy counters in steps of this many kWh (e.g. 0.1); default 0.001")
    parser.add_argument("--forward", type=float, default=0.0, metavar="KWH", help="import counter at the start")
    parser.add_argument("--reverse", type=float, default=0.0, metavar="KWH", help="export counter at the start")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.time_scale < 0 or args.rate <= 0:
        parser.error("--time-scale must be >= 0 and --rate > 0")
    if not 0 <= args.resolution <= 10:
        parser.error(f"--resolution {args.resolution:g} is not allowed; allowed: 0 to 10 kWh")
    if not (0 <= args.forward < 1e9 and 0 <= args.reverse < 1e9):
        parser.error("--forward and --reverse must be kWh from 0 to 1e9")
    try:
        start = parse_start(args.start)
    except ValueError:
        parser.error(f"--start {args.start!r} is neither epoch seconds nor an ISO date/time")
    profile = HouseholdProfile(solar_peak_w=args.solar_peak, seed=args.seed)
    model = MeterModel(profile, start, local_offset(start), forward_kwh=args.forward, reverse_kwh=args.reverse,
                       resolution_kwh=args.resolution)

    async def run() -> None:
        meter = SimulatedGridMeter(args.name, model, time_scale=args.time_scale, rate_hz=args.rate,
                                   device_instance=args.device_instance)
        await meter.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await meter.run(stop)
        finally:
            meter.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
