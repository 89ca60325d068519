"""A simulated household on a GX of its own, for the cooperative's demo and tests: a battery behind an
inverter that takes a power setpoint, AC-coupled solar panels, a load, and Victron's system calculator.

One process, on the household's bus:
  com.victronenergy.system            what the cooperative reads (coop/runtime.py):
      /Ac/PvOnGrid/L1/Power             the panels (AC-coupled, on the grid side), W
      /Ac/Consumption/L1/Power          the load, W
      /Ac/Grid/L1/Power                 the grid meter, W, + import: load - panels + battery
      /Dc/Battery/Power, /Dc/Battery/Soc, /Ac/Grid/NumberOfPhases, /Ac/Consumption/NumberOfPhases
  com.victronenergy.acsystem.<name>   the inverter in ESS mode 3, as simulator/controllable.py: the
                                      dispatcher writes /Ess/InverterPowerSetpoint (+ charges the battery)
  com.victronenergy.battery.<name>    the battery's monitor: /Soc, /InstalledCapacity (Ah), /Dc/0/Power...
  com.batteryaggregator.household.<name>   the truth, kWh since the start: /Energy/Production,
                                      /Energy/Load, /Energy/Import, /Energy/Export, /Energy/Stored (net
                                      into the battery)

Everything runs on the wall clock, as the cooperative does. Nothing is lost on the way: the grid is
exactly load - panels + battery, so the household's meters add up, V = P + L - T (V: load + stored).
The panels and the load swing slowly around their mean (`--swing`, a fraction, over `--period` seconds),
so the values on the bus live.

    python -m aggregator.simulator.household --name shire --capacity 10000 --soc 30 --pv 300 --load 900
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import time
from dataclasses import dataclass

from aggregator import __version__
from aggregator.bus.lib import connect
from aggregator.bus.service import VeService
from .controllable import ControllableBattery, ControllableOnBus, ControllableParams

_LOG = logging.getLogger("aggregator.simulator.household")

SYSTEM_SERVICE = "com.victronenergy.system"
TRUTH_PREFIX = "com.batteryaggregator.household."
HOUSEHOLD_PRODUCT_ID = 0xB0F3


@dataclass(frozen=True, slots=True)
class Household:
    """Mean powers of the panels and the load, and how they swing (pure)."""

    pv_w: float = 0.0
    load_w: float = 500.0
    swing: float = 0.2  # fraction of the mean
    period_s: float = 120.0

    def powers(self, t: float) -> tuple[float, float]:
        """(panels, load) in W at `t` seconds since the start."""
        phase = 2 * math.pi * t / self.period_s
        pv = max(0.0, self.pv_w * (1 + self.swing * math.sin(phase)))
        load = max(0.0, self.load_w * (1 + self.swing * math.sin(1.7 * phase + 1.0)))
        return round(pv), round(load)


@dataclass(slots=True)
class Meters:
    """What the household's meters counted, kWh."""

    production: float = 0.0
    load: float = 0.0
    grid_import: float = 0.0
    grid_export: float = 0.0
    stored: float = 0.0

    def add(self, seconds: float, pv_w: float, load_w: float, battery_w: float) -> float:
        """Add `seconds` at these powers; returns the grid power (+ import)."""
        grid_w = load_w - pv_w + battery_w
        h = seconds / 3_600_000.0
        self.production += pv_w * h
        self.load += load_w * h
        self.stored += battery_w * h
        self.grid_import += max(grid_w, 0.0) * h
        self.grid_export += max(-grid_w, 0.0) * h
        return grid_w

    def values(self) -> dict[str, float]:
        return {"/Energy/Production": round(self.production, 6), "/Energy/Load": round(self.load, 6),
                "/Energy/Import": round(self.grid_import, 6), "/Energy/Export": round(self.grid_export, 6),
                "/Energy/Stored": round(self.stored, 6)}


class HouseholdOnBus:
    def __init__(self, name: str, household: Household, battery: ControllableParams, *, rate_hz: float = 2.0,
                 device_instance: int = 40) -> None:
        self.name = name
        self.household = household
        self.rate_hz = rate_hz
        self.inverter = ControllableOnBus(ControllableBattery(battery), f"com.victronenergy.acsystem.{name}",
                                          rate_hz=rate_hz, device_instance=device_instance, layout="acsystem",
                                          battery_service_name=f"com.victronenergy.battery.{name}")
        self.meters = Meters()
        self.system: VeService | None = None
        self.truth: VeService | None = None
        self._powers = (0.0, 0.0, 0.0)  # panels, load, battery in force since the last tick

    async def start(self) -> None:
        await self.inverter.start()
        bus = await connect()
        system = VeService(bus, SYSTEM_SERVICE)
        system.add_mandatory_paths(process_name="battery-aggregator household", process_version=__version__,
                                   connection="Simulated", device_instance=0, product_id=HOUSEHOLD_PRODUCT_ID,
                                   product_name="Simulated system calculator")
        for path in ("/Ac/PvOnGrid/L1/Power", "/Ac/Consumption/L1/Power", "/Ac/Grid/L1/Power", "/Dc/Battery/Power"):
            system.add_path(path, 0, text="{:.0f}W")
        system.add_path("/Dc/Battery/Soc", self.inverter.battery.soc, text="{:.1f}%")
        system.add_path("/Ac/Grid/NumberOfPhases", 1)
        system.add_path("/Ac/Consumption/NumberOfPhases", 1)
        await system.register()
        truth = VeService(await connect(), TRUTH_PREFIX + self.name)  # a connection per service, as on a GX
        truth.add_mandatory_paths(process_name="battery-aggregator household", process_version=__version__,
                                  connection="Simulated", device_instance=0, product_id=HOUSEHOLD_PRODUCT_ID,
                                  product_name="Simulated household (the truth)")
        for path, value in self.meters.values().items():
            truth.add_path(path, value, text="{:.4f}kWh")
        await truth.register()
        self.system, self.truth = system, truth
        self.tick(0.0, 0.0)

    def tick(self, dt: float, t: float) -> None:
        """Count the last `dt` s at the powers then in force, move the battery on, publish the new powers."""
        pv, load, battery = self._powers
        self.meters.add(dt, pv, load, battery)
        self.inverter.tick(dt)
        pv, load = self.household.powers(t)
        battery = float(round(self.inverter.battery.measured_w))
        grid = load - pv + battery
        self._powers = (pv, load, battery)
        assert self.system is not None and self.truth is not None
        self.system.set_values({"/Ac/PvOnGrid/L1/Power": pv, "/Ac/Consumption/L1/Power": load,
                                "/Ac/Grid/L1/Power": grid, "/Dc/Battery/Power": battery,
                                "/Dc/Battery/Soc": round(self.inverter.battery.soc, 1)})
        self.truth.set_values(self.meters.values())

    async def run(self, stop: asyncio.Event) -> None:
        start = last = time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0 / self.rate_hz)
            except asyncio.TimeoutError:
                pass
            now = time.monotonic()
            self.tick(now - last, now - start)
            last = now

    def close(self) -> None:
        self.inverter.close()
        for service in (self.system, self.truth):
            if service is not None:
                service.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aggregator.simulator.household", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the household (service suffix)")
    parser.add_argument("--capacity", type=float, default=10000.0, help="battery, Wh")
    parser.add_argument("--soc", type=float, default=50.0, help="%%")
    parser.add_argument("--max-power", type=float, default=3000.0, help="battery charge and discharge, W")
    parser.add_argument("--pv", type=float, default=0.0, help="mean power of the panels, W")
    parser.add_argument("--load", type=float, default=500.0, help="mean load, W")
    parser.add_argument("--swing", type=float, default=0.2, help="how far both swing, fraction of the mean")
    parser.add_argument("--period", type=float, default=120.0, help="seconds of one swing")
    parser.add_argument("--rate", type=float, default=2.0, help="ticks per second")
    parser.add_argument("--device-instance", type=int, default=40)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    battery = ControllableParams(lag_s=1.0, max_charge_w=args.max_power, max_discharge_w=args.max_power,
                                 capacity_wh=args.capacity, soc=args.soc)
    sim = HouseholdOnBus(args.name, Household(args.pv, args.load, args.swing, args.period), battery,
                         rate_hz=args.rate, device_instance=args.device_instance)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await sim.start()
        _LOG.info("household %s running", sim.name)
        await sim.run(stop)
        sim.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
