"""What the aggregate says about its bank: /Aggregator/Status (why it is not "ok"), /Aggregator/Unresolved, the
member counts, /Alarms/MissingBatteries, the chain of aggregates, and each member's /Batteries/<n> row.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .membership import CHAIN_PATH
from .merge import MODULES_OFFLINE
from .publish import json_list_text, member_label
from .rows import DUPLICATE, LOST, ONLINE, STALE, write_measurement_keys, write_row
from .sanitize import check_value

if TYPE_CHECKING:
    from ..bus.service import VeService
    from .charge_limits import ChargeLimits
    from .liveness import Liveness
    from .members import Members

_LOG = logging.getLogger("aggregator")


class BankStatus:
    def __init__(self, name: str, table: Members, limits: ChargeLimits, liveness: Liveness) -> None:
        self.name = name
        self.table = table
        self.limits = limits
        self.liveness = liveness
        self.reasons: list[str] = []  # the membership's, without the limits' notes
        self.absent = 0  # expected batteries that are not on the bus at all
        self._key: tuple[str, ...] | None = None  # what the status is about, without its live values

    def add_paths(self, service: VeService) -> None:
        service.add_path("/System/NrOfBatteries", 0)
        service.add_path("/System/BatteriesParallel", 0)
        service.add_path("/Alarms/MissingBatteries", 0 if self.table.config.expectedBatteries else None)
        service.add_path("/Aggregator/Status", "starting")
        service.add_path("/Aggregator/Unresolved", json_list_text([]))
        service.add_path("/Aggregator/Tasks", None)  # the service's diagnostic, riding along with its flushes
        service.add_path(CHAIN_PATH, [self.name])

    def membership_paths(self, merged: dict[str, Any]) -> None:
        table = self.table
        duplicates = table.duplicates
        present = [n for n, s in table.members.items() if s.state != LOST and n not in duplicates]
        online = [n for n, s in table.members.items() if s.state == ONLINE and n not in duplicates]
        expected = table.config.expectedBatteries
        missing = max(0, expected - len(online)) if expected else 0
        # Expected batteries not on the bus at all count as one offline module each (the stale ones' modules
        # are offline in the merge already).
        self.absent = max(0, expected - len(present)) if expected else 0
        merged[MODULES_OFFLINE] = table.merge.compute_path(MODULES_OFFLINE)
        merged["/System/NrOfBatteries"] = len(present)
        merged["/System/BatteriesParallel"] = len(present)
        merged["/Alarms/MissingBatteries"] = (1 if missing else 0) if expected else None
        merged["/Mgmt/Connection"] = f"Aggregate of {len(present)} batteries"
        merged[CHAIN_PATH] = self._chain(present)
        reasons = []
        awaiting = self.liveness.awaiting
        if awaiting:
            reasons.append(f"starting: charging waits for {len(awaiting)} batteries to answer")
        if missing:
            reasons.append(f"{missing} of {expected} expected batteries missing")
        stale = sorted(n for n, s in table.members.items() if s.state == STALE)
        if stale:
            reasons.append("stale: " + ", ".join(stale))
        lost = sorted(n for n, s in table.members.items() if s.state == LOST)
        if lost:
            reasons.append("lost: " + ", ".join(lost))
        if duplicates:
            reasons.append("not counted twice: " + ", ".join(
                f"{n} (same battery as {table.stands_for(n)})" for n in sorted(duplicates)))
        if table.roles.unresolved:
            reasons.append("unresolved: " + ", ".join(table.roles.unresolved))
        if not present:
            reasons.append("no member batteries")
        self.reasons = reasons
        self.publish(merged)
        merged["/Aggregator/Unresolved"] = json_list_text(table.roles.unresolved)

    def _chain(self, present: list[str]) -> list[str]:
        """This aggregate and the aggregates its members are made of."""
        monitor = self.table.monitor
        chain = [self.name]
        for name in present:
            watched = monitor.services.get(name) if monitor is not None else None
            member_chain = check_value(CHAIN_PATH, watched.values.get(CHAIN_PATH))[0] if watched is not None \
                else None
            if isinstance(member_chain, list):
                chain += [c for c in member_chain if isinstance(c, str) and c not in chain]
        return chain

    def publish(self, merged: dict[str, Any]) -> None:
        notes = self.limits.notes
        reasons = self.reasons + [n.text for n in notes]
        status = "; ".join(reasons) or "ok"
        # Logged when what it is about changes, not at every value it shows (a held limit that falls).
        key = tuple(self.reasons) + tuple(n.key for n in notes)
        if key != self._key:
            # While members are still appearing at start-up, status changes are expected: INFO until then.
            (_LOG.warning if reasons and self.table.registered else _LOG.info)("status: %s", status)
            self._key = key
        merged["/Aggregator/Status"] = status

    def write_measurements(self, service: VeService, name: str) -> None:
        """The keys of a member row that show the member's own values, after new measurements alone."""
        state = self.table.members.get(name)
        member = self.table.merge.members.get(name)
        if state is not None and member is not None and state.state != LOST \
                and not write_measurement_keys(service, state.slot, member.values):
            self.write_row(service, name)  # not published yet: the whole row

    def write_row(self, service: VeService, name: str) -> None:
        """A member's whole /Batteries/<n> row."""
        table = self.table
        state = table.members.get(name)
        if state is None:
            return
        member = table.merge.members.get(name)
        values = member.values if member is not None else {}
        watched = table.monitor.services.get(name) if table.monitor is not None else None
        label = member.label if member is not None else (member_label(watched) if watched else name)
        shown = DUPLICATE if name in table.duplicates and state.state != LOST else state.state
        write_row(service, state.slot, name, label, shown, values if state.state != LOST else None,
                  self.limits.rows.get(name, {}))
