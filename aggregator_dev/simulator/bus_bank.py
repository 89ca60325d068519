"""The simulated bank on D-Bus: every pack a `com.victronenergy.battery.<suffix>` service, as a real BMS.

Each pack has its own connection (monitors map a sender to one service) and, as Victron's services do, signals
only the values that changed, with one ItemsChanged per tick (none when nothing changed). 'quiet' holds a
pack's values still (it signals nothing but answers, a battery at rest); 'freeze' is a frozen process (it
neither signals nor answers). Faults come from the scenario (`at` = wall-clock seconds after start) or at run time
through the control service `CONTROL_SERVICE`:
  /Packs/<suffix>/Fault          write 'quiet' | 'freeze' | 'vanish' | 'invalid' | 'absurd' | 'slow' | 'fets_open' | ''
  /Packs/<suffix>/FaultDuration  seconds the next written fault lasts (0 = until cleared)
  /BankCurrent                   write a current in A to override the profile; invalid = back to the profile
  /Bank/Voltage, /Bank/Current   the simulator's truth
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from aggregator import __version__
from aggregator.battery.paths import text_format
from aggregator.bus.lib import LIBRARY, MessageBus, connect
from aggregator.bus.service import VeService
from aggregator.bus.settings import LocalSettings
from .physics import Pack
from .scenario import Scenario

_LOG = logging.getLogger("aggregator.simulator.bus_bank")

BATTERY_PREFIX = "com.victronenergy.battery."
CONTROL_SERVICE = "org.batteryaggregator.simulator"
SIM_PRODUCT_ID = 0xB0F0  # ours; outside the ids DVCC applies vendor quirks to
FAULT_KINDS = ("quiet", "freeze", "vanish", "invalid", "absurd", "slow", "fets_open")
DEFAULT_SLOW_DELAY = 5.0

# Values a misbehaving BMS has been seen to publish: NaN, a string, negative capacity, SoC 150, inf.
_ABSURD = {
    "/Dc/0/Voltage": math.nan,
    "/Dc/0/Current": "n/a",
    "/Dc/0/Power": math.inf,
    "/Soc": 150.0,
    "/Capacity": -100.0,
    "/InstalledCapacity": -280.0,
    "/Info/MaxChargeCurrent": 1e12,
    "/Dc/0/Temperature": -273.5,
}
# Measured values that go invalid in the 'invalid' fault (a BMS that lost its cell board).
_MEASURED = ("/Dc/0/Voltage", "/Dc/0/Current", "/Dc/0/Power", "/Dc/0/Temperature", "/Soc", "/Capacity",
             "/Info/MaxChargeCurrent", "/Info/MaxDischargeCurrent", "/Info/MaxChargeVoltage",
             "/System/MinCellVoltage", "/System/MaxCellVoltage")


@dataclass(slots=True)
class PackOnBus:
    pack: Pack
    name: str
    device_instance: int
    service: VeService | None = None
    faults: dict[str, float] = field(default_factory=dict)  # kind -> wall-clock end (inf = until cleared)
    slow_delay: float = DEFAULT_SLOW_DELAY

    def has(self, kind: str) -> bool:
        return kind in self.faults


class SimulatedBank:
    def __init__(self, scenario: Scenario, bus_address: str | None = None) -> None:
        self.scenario = scenario
        self.bus_address = bus_address
        self.bank = scenario.build_bank()
        self.profile = scenario.build_profile()
        self.members = {
            p.service: PackOnBus(p, BATTERY_PREFIX + p.service, 512 + i) for i, p in enumerate(self.bank.packs)
        }
        self.sim_time = 0.0
        self.current_override: float | None = None
        self.control: VeService | None = None
        self.settings: LocalSettings | None = None
        self._started_at = 0.0
        self._pending_faults = sorted(scenario.faults, key=lambda f: f.at)
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- life cycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        control_bus = await connect(self.bus_address)
        self.settings = LocalSettings(control_bus, timeout=2.0)
        await self.settings.start()
        for member in self.members.values():
            # Like a real driver: the device instance is reserved in localsettings under a stable id.
            member.device_instance = await self.settings.reserve_device_instance(
                f"sim_{member.pack.service}", "battery", member.device_instance)
            await self._publish(member)
        self.control = await self._control_service(control_bus)
        self._started_at = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until `stop` is set: advance the physics, then publish every pack that is not frozen."""
        period = 1.0 / self.scenario.rate_hz
        next_tick = time.monotonic()
        while not stop.is_set():
            self.tick()
            next_tick += period
            delay = next_tick - time.monotonic()
            if delay < -period:  # we fell behind (a loaded machine): do not try to catch up in a burst
                next_tick = time.monotonic()
                delay = 0
            try:
                await asyncio.wait_for(stop.wait(), max(delay, 0))
            except asyncio.TimeoutError:
                pass

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for member in self.members.values():
            if member.service is not None:
                member.service.close()
                member.service = None
        if self.settings is not None:
            await self.settings.stop()
        if self.control is not None:
            self.control.close()

    # ---- one tick ------------------------------------------------------------------------------------

    def tick(self) -> None:
        now = time.monotonic()
        self._apply_scheduled_faults(now - self._started_at)
        self._expire_faults(now)
        for member in self.members.values():
            member.pack.forced_fets_open = member.has("fets_open")
        dt = self.scenario.tick_seconds
        requested = self.current_override if self.current_override is not None else self.profile(self.sim_time)
        state = self.bank.step(requested, dt)
        self.sim_time += dt
        for member in self.members.values():
            service = member.service
            if service is None or member.has("freeze") or member.has("quiet"):
                continue
            service.set_values(self._values_of(member))
        if self.control is not None:
            self.control.set_values({"/Bank/Voltage": round(state.voltage, 3),
                                     "/Bank/Current": round(state.i_actual, 2),
                                     "/Bank/RequestedCurrent": round(requested, 2),
                                     "/SimTime": round(self.sim_time, 1)})

    def _values_of(self, member: PackOnBus) -> dict[str, Any]:
        values = member.pack.values()
        if member.has("invalid"):
            for path in _MEASURED:
                values[path] = None
        if member.has("absurd"):
            values.update(_ABSURD)
        return values

    # ---- faults --------------------------------------------------------------------------------------

    def inject(self, service: str, kind: str, duration: float | None = None, delay: float | None = None) -> None:
        """Start a fault on a pack now; `duration` None or 0 = until cleared with clear()."""
        member = self.members[service]
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {', '.join(FAULT_KINDS)}")
        member.faults[kind] = time.monotonic() + duration if duration else math.inf
        _LOG.info("fault %s on %s for %s", kind, member.name, f"{duration:g} s" if duration else "ever")
        if kind == "slow":
            member.slow_delay = delay if delay is not None else DEFAULT_SLOW_DELAY
            if member.service is not None:
                member.service.reply_delay = member.slow_delay
        elif kind == "freeze" and member.service is not None:
            member.service.answering = False
        elif kind == "vanish" and member.service is not None:
            member.service.close()
            member.service = None

    def clear(self, service: str, kind: str | None = None) -> None:
        member = self.members[service]
        for k in [kind] if kind else list(member.faults):
            if member.faults.pop(k, None) is not None:
                self._end_fault(member, k)

    def _apply_scheduled_faults(self, elapsed: float) -> None:
        while self._pending_faults and self._pending_faults[0].at <= elapsed:
            fault = self._pending_faults.pop(0)
            self.inject(fault.pack, fault.kind, fault.duration, getattr(fault, "delay", None))

    def _expire_faults(self, now: float) -> None:
        for member in self.members.values():
            for kind, end in list(member.faults.items()):
                if end <= now:
                    del member.faults[kind]
                    self._end_fault(member, kind)

    def _end_fault(self, member: PackOnBus, kind: str) -> None:
        _LOG.info("fault %s on %s ended", kind, member.name)
        if self.control is not None and not member.faults:
            self.control.set_value(f"/Packs/{member.pack.service}/Fault", "")
        if kind == "slow" and member.service is not None:
            member.service.reply_delay = 0.0
        elif kind == "freeze" and member.service is not None:
            member.service.answering = True
        elif kind == "vanish" and member.service is None:
            self._spawn(self._publish(member))

    # ---- publishing ----------------------------------------------------------------------------------

    async def _publish(self, member: PackOnBus) -> None:
        bus: MessageBus = await connect(self.bus_address)
        pack = member.pack
        service = VeService(bus, member.name)
        service.add_mandatory_paths(
            process_name="battery-aggregator simulate", process_version=__version__,
            connection=f"Simulated ({self.scenario.name})", device_instance=member.device_instance,
            product_id=SIM_PRODUCT_ID, product_name=pack.params.product_name,
            firmware_version="sim-1.0", hardware_version="sim",
        )
        for path, value in pack.values().items():
            if path in service:
                continue
            if path == "/CustomName":
                service.add_path(path, value, writeable=True, value_types=(str,))
            else:
                service.add_path(path, value, text=text_format(path))
        if member.has("slow"):
            service.reply_delay = member.slow_delay
        service.answering = not member.has("freeze")
        await service.register()
        member.service = service

    async def _control_service(self, bus: MessageBus) -> VeService:
        control = VeService(bus, CONTROL_SERVICE)
        control.add_path("/Scenario", self.scenario.name)
        control.add_path("/SimTime", 0.0, text="{:.0f}s")
        control.add_path("/Bank/Voltage", None, text="{:.2f}V")
        control.add_path("/Bank/Current", None, text="{:.1f}A")
        control.add_path("/Bank/RequestedCurrent", None, text="{:.1f}A")
        control.add_path("/BankCurrent", None, writeable=True, value_types=(int, float),
                         on_change=self._on_current_override, text="{:.1f}A",
                         description="bank current override in A (+ charge); invalid = follow the profile")
        for suffix, member in self.members.items():
            control.add_path(f"/Packs/{suffix}/Service", member.name)
            control.add_path(f"/Packs/{suffix}/FaultDuration", 0.0, writeable=True, value_types=(int, float))
            control.add_path(f"/Packs/{suffix}/Fault", "", writeable=True, value_types=(str,),
                             on_change=lambda path, kind: self._on_fault_write(path, kind),
                             description=f"write one of {', '.join(FAULT_KINDS)}, or '' to clear")
        await control.register()
        return control

    def _on_current_override(self, _path: str, value: Any) -> bool:
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            return False
        self.current_override = None if value is None else float(value)
        return True

    def _on_fault_write(self, path: str, kind: Any) -> bool:
        suffix = path.split("/")[2]
        if kind == "":
            self.clear(suffix)
            return True
        if kind not in FAULT_KINDS:
            return False
        assert self.control is not None
        duration = self.control[f"/Packs/{suffix}/FaultDuration"] or None
        self.inject(suffix, kind, duration)
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def simulate(scenario: Scenario, stop: asyncio.Event, bus_address: str | None = None) -> None:
    bank = SimulatedBank(scenario, bus_address)
    await bank.start()
    _LOG.info("simulating %d packs (%s) at %g Hz, %gx time, on %s", len(bank.members), scenario.name,
              scenario.rate_hz, scenario.time_scale, LIBRARY)
    try:
        await bank.run(stop)
    finally:
        await bank.close()
