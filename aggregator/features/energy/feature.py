"""The energy feature on the aggregate: ledgers per battery identity, external reports (D-Bus methods and the
optional HTTP endpoint) and the /History/*Energy and /Energy/* paths, published at most every second."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from ...battery.publish import add_battery_path
from ...bus.settings import SETTINGS_SERVICE
from ...local_time import TIME_ZONE_PATH
from ..base import Bank, Feature
from .endpoint import ReportHttpServer, add_report_methods
from .runtime import ENERGY_INPUTS, EnergyTracker, text_key

if TYPE_CHECKING:
    from ...bus.service import VeService
    from ...config import Config

ENERGY_REFRESH = 10.0  # seconds: the energy paths are republished at least this often (what time alone changes)
# Seconds: at most this often after members' samples alone; kWh totals move slowly, and a change of the members
# (rows) or a report shows at once.
ENERGY_INTERVAL = 5.0


class EnergyFeature(Feature):
    name = "energy"
    reads = ENERGY_INPUTS
    # Dates in the user's zone, not the process's (UTC on a GX).
    watches = ((SETTINGS_SERVICE, TIME_ZONE_PATH),)
    publishes = ("/History/ChargedEnergy", "/History/DischargedEnergy", "/Energy/", "/Batteries/<n>/History/")

    def __init__(self, config: Config) -> None:
        self.tracker = EnergyTracker(config.energy, config.stateDir)
        self.http_port, self.http_bind = config.energy.httpPort, config.energy.httpBind
        self._http: ReportHttpServer | None = None
        self._service: VeService | None = None
        self._bank: Bank | None = None
        # What the energy paths were last published from: a quiet bank's change with time alone, if at all.
        self._changed = True
        self._rows: list[tuple[str, int, bool]] = []
        self._published_at = -ENERGY_REFRESH

    def load(self) -> None:
        self.tracker.load()

    async def mount(self, service: VeService, bus: Any, bank: Bank) -> None:
        self._service, self._bank = service, bank
        add_report_methods(service, self._take_report, self._remove_report)
        if self.http_port is not None:
            self._http = ReportHttpServer(self._take_report, self.http_bind, self.http_port,
                                          remove=self._remove_report, token=lambda: self.tracker.options.httpToken)
            await self._http.start()

    async def stop(self) -> None:
        self.tracker.save()
        if self._http is not None:
            await self._http.stop()

    def on_member(self, name: str, values: Mapping[str, Any], changes: Mapping[str, Any]) -> None:
        self.tracker.sample(name, values, changes)
        self._changed = True

    def on_pack(self, name: str) -> None:
        """A member joined, left or publishes another pack: its ledger, and the packs counted once."""
        bank = self._bank
        if bank is None:
            return
        self.tracker.note_duplicates(bank.duplicates())
        identity = bank.identity_of(name)
        if identity is None:
            self.tracker.remove_member(name)
        else:
            self.tracker.set_member(name, identity, bank.member_values(name))

    def on_setting(self, service: str, path: str, value: Any) -> None:
        if path == TIME_ZONE_PATH:
            self.tracker.time_zone.changed(value)

    def tick(self) -> None:
        self.tracker.tick()
        if self._bank is None:
            return
        rows = self._bank.member_rows()
        since = self.tracker.clock() - self._published_at
        if rows != self._rows or since >= (ENERGY_INTERVAL if self._changed else ENERGY_REFRESH):
            self.publish()

    def save(self) -> None:
        self.tracker.save()

    def needs_restart(self, old: Config, new: Config) -> bool:
        return (new.energy.httpPort, new.energy.httpBind) != (old.energy.httpPort, old.energy.httpBind)

    def reconfigure(self, config: Config, bank: Bank) -> None:
        self.tracker.note_duplicates(bank.duplicates())
        self.tracker.reconfigure(config.energy, bank.identity_of, bank.member_values)

    def publish(self) -> None:
        """The energy paths, at most every second (the ledgers change with every sample; nobody needs more)."""
        service, bank = self._service, self._bank
        if service is None or bank is None:
            return
        self._changed, self._rows, self._published_at = False, bank.member_rows(), self.tracker.clock()
        with service.batch():
            for path, value in self.tracker.values(self._rows, bank.member_values).items():
                if path in service:
                    service.set_value(path, value)
                else:
                    add_battery_path(service, path, value, text_key(path))

    def _take_report(self, fields: Any) -> str:
        """An external battery's report (D-Bus method or HTTP); ReportError goes back to the caller."""
        try:
            return self.tracker.report(fields)
        finally:  # reports are rare: show it (or the status a refused one set) now rather than at a later tick
            self.publish()

    def _remove_report(self, identity: Any) -> str:
        """Forget an external battery (D-Bus Remove, HTTP POST /remove); ReportError when it is not one."""
        try:
            return self.tracker.remove_external(identity)
        finally:
            self.publish()
