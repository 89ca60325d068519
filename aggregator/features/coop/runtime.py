"""The cooperative on the running service: the site's own state from D-Bus in, the battery target out.

Each cycle it reads the aggregate battery (level, capacity, power) from our own service and the household's
production, consumption and grid power from Victron's system calculator (`com.victronenergy.system`),
steps the MQTT site (core.py decides), hands the battery target to the dispatcher when one runs, and
publishes the fleet view under /Coop/*.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Protocol

from ...bus import client
from ...bus.beats import beat
from ...bus.service import VeService
from ...state import StateStore
from .core import PeerState, SiteTarget
from .ledger import Account, Ledger
from .site import CoopSite, DbusCurtailAdapter
from .settings import CoopSettings

_LOG = logging.getLogger("aggregator.coop.runtime")

SYSTEM = "com.victronenergy.system"
PREFIX = "/Coop"
PHASES = ("L1", "L2", "L3")
# Production: PV on the DC bus, and PV inverters on the grid side and on the inverter's output.
PRODUCTION_PATHS = ("/Dc/Pv/Power", *(f"/Ac/PvOnGrid/{p}/Power" for p in PHASES),
                    *(f"/Ac/PvOnOutput/{p}/Power" for p in PHASES))
CONSUMPTION_PATHS = tuple(f"/Ac/Consumption/{p}/Power" for p in PHASES)
GRID_PATHS = tuple(f"/Ac/Grid/{p}/Power" for p in PHASES)
LEDGER_FILE = "coop_ledger.json"
LEDGER_SAVE_S = 300.0
STOP_TIMEOUT_S = 5.0
MAX_METERED_GAP_S = 120.0  # a longer gap between two cycles is not metered: no energy is invented for it


def period_of(now: float) -> str:
    """The settlement period a moment belongs to: the calendar month, local time."""
    return time.strftime("%Y-%m", time.localtime(now))


def load_ledger(state_dir: str) -> Ledger:
    """The metered accounts kept under state_dir, keyed '<siteId> <YYYY-MM>' (garbage entries are skipped)."""
    ledger = Ledger()
    names = {f.name for f in dataclasses.fields(Account)}
    for key, values in StateStore(os.path.join(state_dir, LEDGER_FILE)).load().items():
        if isinstance(values, dict):
            ledger.accounts[key] = Account(**{k: float(v) for k, v in values.items()
                                             if k in names and isinstance(v, (int, float))})
    return ledger


def save_ledger(state_dir: str, ledger: Ledger) -> None:
    StateStore(os.path.join(state_dir, LEDGER_FILE)).save(
        {key: dataclasses.asdict(account) for key, account in ledger.accounts.items()})


class TargetSink(Protocol):
    def set_target(self, value: Any) -> bool: ...


def own_state(site_id: str, battery: dict[str, Any], system: dict[str, Any], now: float) -> PeerState | None:
    """Our PeerState from the aggregate's values and the system's; None while the battery is unknown."""
    soc, installed_ah, voltage = battery.get("/Soc"), battery.get("/InstalledCapacity"), battery.get("/Dc/0/Voltage")
    if not all(isinstance(v, (int, float)) for v in (soc, installed_ah, voltage)) or installed_ah <= 0 or voltage <= 0:
        return None
    capacity_kwh = installed_ah * voltage / 1000.0
    return PeerState(site_id=site_id, level=float(soc), stored_kwh=capacity_kwh * soc / 100.0,
                     capacity_kwh=capacity_kwh, production_w=_sum(system, PRODUCTION_PATHS),
                     consumption_w=_sum(system, CONSUMPTION_PATHS), grid_w=_sum(system, GRID_PATHS), timestamp=now)


def _sum(values: dict[str, Any], paths: tuple[str, ...]) -> float:
    return float(sum(v for p in paths if isinstance(v := values.get(p), (int, float))))


class CoopRuntime:
    """Construct before the service registers (it adds its paths), then `await start()`."""

    def __init__(self, settings: CoopSettings, service: VeService, bus: Any, *, dispatcher: TargetSink | None = None,
                 state_dir: str | None = None, clock: Callable[[], float] = time.time,
                 cycle_s: float | None = None) -> None:
        self.settings = settings
        self.service = service
        self.bus = bus
        self.dispatcher = dispatcher
        self.clock = clock
        self.cycle_s = cycle_s or min(settings.publishSeconds, 10.0)
        curtail = settings.curtail
        adapter = None
        if curtail.adapter == "dbus" and curtail.service and curtail.path:
            adapter = DbusCurtailAdapter(bus, curtail.service, curtail.path, curtail.curtailedValue,
                                         curtail.releasedValue)
        self.site = CoopSite(settings, clock=clock, curtail_adapter=adapter)
        self.last: SiteTarget | None = None
        self.state_dir = state_dir
        self.ledger = load_ledger(state_dir) if state_dir else Ledger()
        self._metered_at: float | None = None
        self._saved_at = clock()
        self._tasks: list[asyncio.Task[Any]] = []
        for path, value in (("PeersOnline", 0), ("AverageLevel", None), ("OwnLevel", None), ("OwnTarget", None),
                            ("Transfer", None), ("Curtailed", 0), ("Status", "starting")):
            service.add_path(f"{PREFIX}/{path}", value)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.site.run()), loop.create_task(self._cycle())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a cancellation swallowed inside the MQTT library must not hang the service's shutdown.
            _done, pending = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_S)
            if pending:
                _LOG.warning("the cooperative's MQTT client did not stop within %g s; leaving it", STOP_TIMEOUT_S)
        self._tasks = []
        if self.state_dir:
            save_ledger(self.state_dir, self.ledger)

    async def _cycle(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad value of another service must not end the cooperative
                _LOG.exception("coop cycle failed")
            await beat(self.cycle_s)  # with the service's tick: one wake-up

    async def read_system(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        try:
            reply = await client.call(self.bus, SYSTEM, "/", "GetItems", timeout=2.0, patient=True)
            values = client.parse_items(reply.body[0] if reply.body else None)
        except client.CallError:
            pass  # no system calculator (a PC, a test): production, consumption and grid count as 0
        return values

    async def step(self) -> SiteTarget | None:
        now = self.clock()
        battery = {p: self.service[p] for p in ("/Soc", "/InstalledCapacity", "/Dc/0/Voltage", "/Dc/0/Power")
                   if p in self.service}
        own = own_state(self.site.site_id, battery, await self.read_system(), now)
        if own is None:
            self._publish(None, "waiting for the battery's SoC, capacity and voltage")
            return None
        power = battery.get("/Dc/0/Power")
        battery_w = float(power) if isinstance(power, (int, float)) else 0.0
        target = await self.site.step(own, battery_w)
        self._meter(own, battery_w, target, now)
        self.last = target
        status = target.reason
        if self.site.ignored:  # say why a peer does not count: a lying or broken peer is seen on the GX
            ignored = sorted(self.site.ignored.items())
            status += "; ignoring " + ", ".join(f"{site} ({why})" for site, why in ignored[:3])
            if len(ignored) > 3:
                status += f" and {len(ignored) - 3} more"
        capped = self.site.capped(now)
        if capped:
            status += "; drew the day's bound from the fleet: " + ", ".join(
                f"{site} ({kwh:.1f} kWh)" for site, kwh in list(capped.items())[:3])
        if self.dispatcher is not None and not self.dispatcher.set_target(target.battery_w):
            status = f"{status}; the dispatcher refused {target.battery_w:.0f} W"
        self._publish(target, status, own.level)
        return target

    def _meter(self, own: PeerState, battery_w: float, target: SiteTarget, now: float) -> None:
        """Meter the time since the last cycle at this cycle's powers (V = P + L - T per period)."""
        if self._metered_at is not None and 0 < now - self._metered_at <= MAX_METERED_GAP_S:
            self.ledger.record(f"{own.site_id} {period_of(now)}", now - self._metered_at,
                               production_w=own.production_w, load_w=own.consumption_w, battery_w=battery_w,
                               grid_w=own.grid_w, transfer_w=target.transfer_w)
        self._metered_at = now
        if self.state_dir and now - self._saved_at >= LEDGER_SAVE_S:
            self._saved_at = now
            save_ledger(self.state_dir, self.ledger)

    def _publish(self, target: SiteTarget | None, status: str, level: float | None = None) -> None:
        fleet = self.site.fleet()
        with self.service.batch():
            self.service.set_value(f"{PREFIX}/PeersOnline", len(self.site.peers_online()))
            self.service.set_value(f"{PREFIX}/AverageLevel", round(fleet.level, 2) if fleet else None)
            self.service.set_value(f"{PREFIX}/OwnLevel", level)
            self.service.set_value(f"{PREFIX}/OwnTarget", round(target.battery_w) if target else None)
            self.service.set_value(f"{PREFIX}/Transfer", round(target.transfer_w) if target else None)
            self.service.set_value(f"{PREFIX}/Curtailed", int(self.site.curtailment.curtailed))
            self.service.set_value(f"{PREFIX}/Status", status if self.site.connected.is_set()
                                   else f"{status}; broker not connected")
